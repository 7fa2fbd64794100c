"""modeld's own log records in the journal, each tagged with the model it is about.

``journalctl MODELD_MODEL=demo`` then shows modeld's lines about ``demo`` together with
the lines of demo's backend (which its log relay tags the same way, see
:mod:`modeld.system.journald`). The model of a record is, in this order:

- ``extra={"model": name}`` on the logging call;
- the model whose owner task (or a task or callback created from it) logs: the supervisor
  creates each owner inside :func:`attributed_to`, a context variable that asyncio copies
  into every task and callback, so no logging call has to name its model.

``MODELD_UNIT`` is added when the model has a backend scope (:func:`set_unit_lookup`).
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Callable
from typing import ClassVar, TypeVar

from modeld.system.journald import Journal

T = TypeVar("T")

_MODEL: contextvars.ContextVar[str] = contextvars.ContextVar("modeld_model", default="")
_unit_of: Callable[[str], str] = lambda _model: ""  # noqa: E731


def attributed_to(model: str, create: Callable[[], T]) -> T:
    """Call ``create`` where log records are about ``model``; the tasks and callbacks it
    creates (an owner's task) keep that, and so does everything they create in turn."""

    def run() -> T:
        _MODEL.set(model)
        return create()

    return contextvars.copy_context().run(run)


def model_of(record: logging.LogRecord) -> str:
    model = getattr(record, "model", None)
    return model if isinstance(model, str) and model else _MODEL.get()


def set_unit_lookup(unit_of: Callable[[str], str]) -> None:
    """How to find a model's current scope unit ("" when it has none)."""
    global _unit_of
    _unit_of = unit_of


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal (``$JOURNAL_STREAM``)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


class JournalHandler(logging.Handler):
    """Sends records to journald natively; ``fallback`` (stderr, a journal stream) gets
    those journald refuses, and those it cannot take at once: modeld's event loop never
    waits for journald's datagram queue (such a line reaches the journal without the
    MODELD_ fields)."""

    PRIORITY: ClassVar[dict[int, str]] = {
        logging.DEBUG: "7",
        logging.INFO: "6",
        logging.WARNING: "4",
        logging.ERROR: "3",
        logging.CRITICAL: "2",
    }

    def __init__(
        self,
        fallback: logging.Handler,
        *,
        journal: Journal | None = None,
        identifier: str = "modeld",
    ) -> None:
        super().__init__()
        self.fallback = fallback
        self.identifier = identifier
        self._journal = journal or Journal(blocking=False)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {
            "MESSAGE": self.format(record),
            "PRIORITY": self.PRIORITY.get(record.levelno, "6"),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": str(record.name),
            "CODE_FILE": str(record.pathname),
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": str(record.funcName),
        }
        model = model_of(record)
        if model:
            fields["MODELD_MODEL"] = model
            unit = _unit_of(model)
            if unit:
                fields["MODELD_UNIT"] = unit
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._journal.send(self.fields(record))
        except OSError:
            self.fallback.handle(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._journal.close()
        super().close()
