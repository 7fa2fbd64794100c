"""What the front door reports about each OpenAI request, for metrics.

Every OpenAI route reports through a :class:`RequestMetrics` given to
:func:`modeld.http.app.build_app`; :class:`NoMetrics` is the default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

CLIENT_CLOSED = 499
"""The status reported for a request whose client went away before its answer ended."""


class RequestMetrics(Protocol):
    """Receives one call per finished request, and one per first streamed token.

    ``model`` is a configured model's name, or "" when the request named no model, an
    unknown one or was invalid before naming one; ``route`` is the path template (e.g.
    ``"/v1/chat/completions"``, ``"/v1/models/{id}"``). Calls are made on the event loop
    and must not block.
    """

    def request_finished(self, model: str, route: str, status: int, seconds: float) -> None:
        """A request ended after ``seconds``. ``status`` is the HTTP status; for a stream
        that failed after its headers were sent, the status its error would have had; 499
        when the client went away first."""

    def first_token(self, model: str, route: str, seconds: float) -> None:
        """A streamed request sent its first token ``seconds`` after it arrived."""


class NoMetrics:
    """Reports nowhere."""

    def request_finished(self, model: str, route: str, status: int, seconds: float) -> None:
        pass

    def first_token(self, model: str, route: str, seconds: float) -> None:
        pass


@dataclass(slots=True)
class Exchange:
    """One request as the metrics see it, filled in by the route as it learns more."""

    route: str
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    """The configured model it is for, once known."""
    status: int | None = None
    """Set when the outcome differs from the response's status (an error inside a stream)."""

    def elapsed(self) -> float:
        return time.monotonic() - self.started
