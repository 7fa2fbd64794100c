"""Parsing and formatting of sizes and durations, in the style of systemd.

Sizes use 1024-based multipliers (``K``, ``M``, ``G``, ``T``, ``P``, ``E``),
with an optional ``B`` or ``iB`` suffix, so ``512M``, ``512MB`` and ``512MiB``
are all 536870912 bytes.  ``infinity`` means "no limit" and is represented by
:data:`UINT64_MAX`, like systemd does.

Durations are a plain number of seconds (``90``) or a sequence of
number-and-unit pairs (``1h30m``, ``500ms``, ``1.5s``).

Every parse error is a :class:`ValueError` whose message is one short line
ending in ``(got ...)`` with the offending input.
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Final

__all__ = ["UINT64_MAX", "format_size", "parse_duration", "parse_size"]

UINT64_MAX: Final = 2**64 - 1
"""The value of an unlimited size (systemd's ``infinity``)."""

DURATION_MAX: Final = 2**63 / 1_000_000
"""The longest duration, in seconds (about 292,000 years): its microseconds fit systemd's
``t`` (``usec_t``) with room to spare, so every accepted duration can be sent to systemd."""

SIZE_HINT: Final = "expected a size like 512M, 2G or 80%"
DURATION_HINT: Final = "expected a duration like 90, 500ms, 15m or 1h30m"

_SIZE_RE: Final = re.compile(
    r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<unit>[KMGTPE])(?:i?B)?|(?P<bytes>B)?)",
    re.IGNORECASE,
)
_PERCENT_RE: Final = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+)\s*%")
_NUMBER_RE: Final = re.compile(r"\d+(?:\.\d*)?|\.\d+")
_DURATION_PART_RE: Final = re.compile(r"\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zµμ]+)\s*")

_SIZE_UNITS: Final = {"K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_FORMAT_UNITS: Final = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")

_DURATION_UNITS: Final[dict[str, Decimal]] = {
    **dict.fromkeys(("us", "usec", "µs", "μs"), Decimal("0.000001")),
    **dict.fromkeys(("ms", "msec"), Decimal("0.001")),
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), Decimal(1)),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), Decimal(60)),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), Decimal(3600)),
    **dict.fromkeys(("d", "day", "days"), Decimal(86400)),
    **dict.fromkeys(("w", "week", "weeks"), Decimal(604800)),
}


_ECHO_MAX: Final = 60


def _got(value: object) -> str:
    if isinstance(value, str):
        if len(value) > _ECHO_MAX:
            value = value[: _ECHO_MAX - 1] + "…"
        return f"(got {json.dumps(value, ensure_ascii=False)})"
    text = repr(value)
    if len(text) > _ECHO_MAX:
        text = text[: _ECHO_MAX - 1] + "…"
    return f"(got {text})"


def parse_size(text: str | int, *, total: int | None = None) -> int:
    """Parse a size into bytes.

    Accepts a non-negative ``int`` (bytes), a number with an optional 1024-based
    unit (``"100K"``, ``"1.5G"``, ``"512MiB"``, ``"512MB"``, ``"4096"``, ``"512 B"``),
    ``"infinity"`` (returns :data:`UINT64_MAX`) and a percentage (``"80%"``) of
    ``total``, which must then be given.  Fractional byte counts are rounded
    down.  The result is always in ``0..UINT64_MAX``.

    Raises:
        ValueError: for anything else, with a one-line message.
        TypeError: if ``text`` is neither ``str`` nor ``int``.
    """
    if isinstance(text, bool) or not isinstance(text, int | str):
        raise TypeError(f"size must be a str or int, not {type(text).__name__}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size must not be negative {_got(text)}")
        if text > UINT64_MAX:
            raise ValueError(f"size is too large {_got(text)}")
        return text
    stripped = text.strip()
    if stripped.lower() == "infinity":
        return UINT64_MAX
    if stripped.startswith("-"):
        raise ValueError(f"a size must not be negative {_got(text)}")
    if match := _PERCENT_RE.fullmatch(stripped):
        if total is None:
            raise ValueError(f"a percentage is not allowed here {_got(text)}")
        percent = Decimal(match["num"])
        if percent > 100:
            raise ValueError(f"a percentage must be at most 100% {_got(text)}")
        return int(Decimal(total) * percent / 100)
    match = _SIZE_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"{SIZE_HINT} {_got(text)}")
    unit = match["unit"]
    factor = 1024 ** _SIZE_UNITS[unit.upper()] if unit else 1
    value = int(Decimal(match["num"]) * factor)
    if value > UINT64_MAX:
        raise ValueError(f"size is too large {_got(text)}")
    return value


def format_size(n: int) -> str:
    """Format a byte count for humans: ``"512 B"``, ``"512.0 MiB"``, ``"1.5 GiB"``.

    :data:`UINT64_MAX` is shown as ``"infinity"``.  The output is accepted by
    :func:`parse_size` (up to the rounding to one decimal).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"size must be an int, not {type(n).__name__}")
    if n < 0:
        raise ValueError(f"a size must not be negative {_got(n)}")
    if n == UINT64_MAX:
        return "infinity"
    if n < 1024:
        return f"{n} B"
    exponent = min((n.bit_length() - 1) // 10, len(_FORMAT_UNITS))
    return f"{n / 1024**exponent:.1f} {_FORMAT_UNITS[exponent - 1]}"


def parse_duration(text: str | int | float) -> float:
    """Parse a duration into seconds.

    Accepts a non-negative finite number of seconds (as a number or a string
    such as ``"90"`` or ``"1.5"``), or one or more number-and-unit pairs,
    optionally separated by spaces: ``"500ms"``, ``"1.5s"``, ``"15m"``,
    ``"1h30m"``, ``"2d"``, ``"1h 30min"``.  Units (lower case, like systemd):
    ``us``, ``ms``, ``s``/``sec``, ``m``/``min``, ``h``/``hr``, ``d``, ``w``
    and their long spellings.

    Raises:
        ValueError: for anything else, with a one-line message.
        TypeError: if ``text`` is not ``str``, ``int`` or ``float``.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise TypeError(f"duration must be a str, int or float, not {type(text).__name__}")
    if not isinstance(text, str):
        if math.isnan(text) or math.isinf(text):
            raise ValueError(f"{DURATION_HINT} {_got(text)}")
        if text < 0:
            raise ValueError(f"a duration must not be negative {_got(text)}")
        return _bounded(float(text), text)
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"a duration must not be negative {_got(text)}")
    if _NUMBER_RE.fullmatch(stripped):
        return _bounded(float(Decimal(stripped)), text)
    total = Decimal(0)
    pos = 0
    while pos < len(stripped) or pos == 0:
        match = _DURATION_PART_RE.match(stripped, pos)
        if match is None or match["unit"] not in _DURATION_UNITS:
            raise ValueError(f"{DURATION_HINT} {_got(text)}")
        total += Decimal(match["num"]) * _DURATION_UNITS[match["unit"]]
        pos = match.end()
    return _bounded(float(total), text)


def _bounded(seconds: float, text: object) -> float:
    if seconds > DURATION_MAX:  # also inf: a string of 400 digits
        raise ValueError(f"duration is too large {_got(text)}")
    return seconds
