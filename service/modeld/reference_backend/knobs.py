"""Test knobs of the reference backend, read from ``ModelOptions.Options``.

Each option is ``key=value`` (LocalAI's ``key:value`` spelling is accepted too when
there is no ``=``); boolean knobs may be given as a bare ``key``. Unknown keys and
bad values are errors naming the key, so a typo in a test never passes silently.

Inside LoadModel the knobs act in this order: ``ignore_sigterm`` (at once, even if the
load then hangs), ``load_delay``, ``crash_on_load``, ``hang_on_load``, ``fail_load``,
then the real load, ``alloc_mb``, and the ``crash_after`` / ``hang_after`` clocks start;
``report_identity`` logs the process's identity at the start of LoadModel.
A later LoadModel replaces all knobs (and cancels pending ``crash_after``/``hang_after``);
Free cancels them too. ``predict_delay`` applies to Predict, PredictStream and Embedding.

Misbehaviour on purpose (fuzzing modeld): ``health`` makes Health hang or fail, ``garbage``
makes every reply nonsense (invalid UTF-8, NaN embeddings, impossible counts and states),
``escape`` forks a child that leaves the session and double-forks (a grandchild that ignores
SIGTERM and outlives the backend unless its cgroup is killed), ``flood_mbps`` writes that
many MB of log lines per second for as long as the process lives. Knobs given at startup
(``--knob key=value``, repeatable) apply before any LoadModel: ``health`` there makes the
backend unhealthy from the start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any


class KnobError(ValueError):
    """An option that is unknown or has a bad value; the message names the key."""


@dataclass(frozen=True)
class Knobs:
    """The parsed knobs of one LoadModel call (defaults: no knob set)."""

    load_delay: float = 0.0
    """Seconds to sleep inside LoadModel."""
    alloc_mb: int = 0
    """MiB to allocate, touch and keep while the model is loaded."""
    fail_load: str | None = None
    """LoadModel fails with this message."""
    crash_on_load: int | None = None
    """LoadModel exits the process with this code."""
    crash_after: float | None = None
    """Seconds after a successful load at which the process exits with code 3."""
    predict_delay: float = 0.0
    """Seconds each Predict/PredictStream/Embedding waits before working."""
    hang_on_load: bool = False
    """LoadModel never returns."""
    hang_after: float | None = None
    """Seconds after a successful load from which every RPC blocks forever."""
    ignore_sigterm: bool = False
    """SIGTERM is logged and ignored."""
    report_identity: bool = False
    """LoadModel logs what the process was given: ``identity: {json}`` with its uids,
    gids, groups, umask, working directory, environment and the fds it inherited."""
    health: str = "ok"
    """Health answers OK (``ok``), never answers (``hang``) or fails (``error``)."""
    garbage: bool = False
    """Replies are nonsense: invalid UTF-8 text, NaN and infinite embeddings, negative
    counts, a Status state that does not exist."""
    escape: bool = False
    """LoadModel forks a child that calls setsid and forks again: the grandchild (SIGTERM
    blocked) outlives the backend unless its whole cgroup is killed."""
    flood_mbps: float = 0.0
    """MB per second of log lines written to stderr from LoadModel on."""


def _seconds(key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise KnobError(f"option {key!r}: {raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise KnobError(f"option {key!r}: {raw!r} must be a finite number >= 0")
    return value


def _int(key: str, raw: str, minimum: int, maximum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise KnobError(f"option {key!r}: {raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise KnobError(f"option {key!r}: {value} is outside {minimum}..{maximum}")
    return value


def _bool(key: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on", ""):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise KnobError(f"option {key!r}: {raw!r} is not a boolean (1/0, true/false)")


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(key: str, raw: str) -> str:
        if raw not in choices:
            raise KnobError(f"option {key!r}: {raw!r} is not one of {', '.join(choices)}")
        return raw

    return parse


def _message(key: str, raw: str) -> str:
    return raw or f"load failed as asked by option {key!r}"


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "load_delay": _seconds,
    "alloc_mb": lambda k, v: _int(k, v, 0, 1 << 20),
    "fail_load": _message,
    "crash_on_load": lambda k, v: _int(k, v, 0, 255),
    "crash_after": _seconds,
    "predict_delay": _seconds,
    "hang_on_load": _bool,
    "hang_after": _seconds,
    "ignore_sigterm": _bool,
    "report_identity": _bool,
    "health": _choice("ok", "hang", "error"),
    "garbage": _bool,
    "escape": _bool,
    "flood_mbps": lambda k, v: _seconds(k, v) if v else 1.0,
}
assert set(_PARSERS) == {f.name for f in fields(Knobs)}


def split_option(option: str) -> tuple[str, str]:
    """Split ``key=value`` (or ``key:value``, or a bare ``key``) into key and value."""
    for sep in ("=", ":"):
        if sep in option:
            key, _, value = option.partition(sep)
            return key.strip(), value
    return option.strip(), ""


def parse_knobs(options: Iterable[str]) -> Knobs:
    """Parse ``ModelOptions.Options`` into Knobs; raises KnobError on any bad entry.

    Empty entries are ignored; a later entry for the same key wins.
    """
    values: dict[str, Any] = {}
    for option in options:
        if not option.strip():
            continue
        key, raw = split_option(option)
        parser = _PARSERS.get(key)
        if parser is None:
            known = ", ".join(sorted(_PARSERS))
            raise KnobError(f"unknown option {key!r} (known: {known})")
        values[key] = parser(key, raw)
    return Knobs(**values)
