"""Tests for modeld.units: sizes and durations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeld.units import UINT64_MAX, format_size, parse_duration, parse_size

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        (UINT64_MAX, UINT64_MAX),
        ("0", 0),
        ("4096", 4096),
        ("  4096 ", 4096),
        ("512B", 512),
        ("512 B", 512),
        ("100K", 100 * KiB),
        ("100k", 100 * KiB),
        ("512M", 512 * MiB),
        ("512MB", 512 * MiB),
        ("512MiB", 512 * MiB),
        ("512mib", 512 * MiB),
        ("512.0 MiB", 512 * MiB),
        ("1G", GiB),
        ("1.5G", GiB + GiB // 2),
        ("1.5 GiB", GiB + GiB // 2),
        (".5G", GiB // 2),
        ("2T", 2 * TiB),
        ("1P", 1024**5),
        ("1E", 1024**6),
        ("1.5", 1),
        ("infinity", UINT64_MAX),
        ("Infinity", UINT64_MAX),
        (" infinity ", UINT64_MAX),
    ],
)
def test_parse_size_accepts(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [
        ("80%", 1000, 800),
        ("100%", 1000, 1000),
        ("0%", 1000, 0),
        ("12.5%", 1000, 125),
        ("33%", 10, 3),
        (" 50 % ", 16 * GiB, 8 * GiB),
    ],
)
def test_parse_size_percent(text: str, total: int, expected: int) -> None:
    assert parse_size(text, total=total) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'expected a size like 512M, 2G or 80% (got "")'),
        ("   ", 'expected a size like 512M, 2G or 80% (got "   ")'),
        ("lots", 'expected a size like 512M, 2G or 80% (got "lots")'),
        ("1X", 'expected a size like 512M, 2G or 80% (got "1X")'),
        ("1iB", 'expected a size like 512M, 2G or 80% (got "1iB")'),
        ("1GG", 'expected a size like 512M, 2G or 80% (got "1GG")'),
        ("G", 'expected a size like 512M, 2G or 80% (got "G")'),
        ("1,5G", 'expected a size like 512M, 2G or 80% (got "1,5G")'),
        ("1e3", 'expected a size like 512M, 2G or 80% (got "1e3")'),
        ("-1", 'a size must not be negative (got "-1")'),
        ("-1G", 'a size must not be negative (got "-1G")'),
        (-1, "a size must not be negative (got -1)"),
        ("16E", 'size is too large (got "16E")'),
        (2**64, f"size is too large (got {2**64})"),
        ("80%", 'a percentage is not allowed here (got "80%")'),
    ],
)
def test_parse_size_rejects(text: str | int, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == message


def test_parse_size_rejects_percent_over_100() -> None:
    with pytest.raises(ValueError, match=r'at most 100% \(got "150%"\)'):
        parse_size("150%", total=100)


def test_parse_size_error_truncates_long_input() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("x" * 1000)
    assert len(str(info.value)) < 120
    assert "…" in str(info.value)


@pytest.mark.parametrize("value", [True, 1.5, None, [1]])
def test_parse_size_wrong_type(value: object) -> None:
    with pytest.raises(TypeError):
        parse_size(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (512 * MiB, "512.0 MiB"),
        (GiB + GiB // 2, "1.5 GiB"),
        (2 * TiB, "2.0 TiB"),
        (1024**6, "1.0 EiB"),
        (UINT64_MAX, "infinity"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_size(-1)


@given(st.integers(min_value=0, max_value=UINT64_MAX))
def test_int_and_decimal_string_are_identity(n: int) -> None:
    assert parse_size(n) == n
    assert parse_size(str(n)) == n


@given(
    st.integers(min_value=0, max_value=2**20),
    st.sampled_from(list(enumerate("KMGT", start=1))),
    st.sampled_from(["", "B", "iB"]),
    st.booleans(),
)
def test_unit_suffixes_are_powers_of_1024(
    n: int, unit: tuple[int, str], suffix: str, lower: bool
) -> None:
    power, letter = unit
    text = f"{n}{letter}{suffix}"
    assert parse_size(text.lower() if lower else text) == n * 1024**power


@given(st.integers(min_value=0, max_value=2**63))
def test_format_then_parse_is_close(n: int) -> None:
    """format_size rounds to 0.1 of its unit; parsing it back lands within that."""
    text = format_size(n)
    back = parse_size(text)
    unit = 1 if n < 1024 else 1024 ** ((n.bit_length() - 1) // 10)
    assert abs(back - n) <= unit * 0.05 + 1


@given(st.integers(min_value=0, max_value=UINT64_MAX - 1))
def test_format_size_is_never_infinity_for_finite(n: int) -> None:
    assert format_size(n) != "infinity"


@given(
    st.integers(min_value=0, max_value=2**48),
    st.integers(min_value=0, max_value=100),
    st.integers(min_value=0, max_value=100),
)
def test_percent_is_monotonic_and_bounded(total: int, a: int, b: int) -> None:
    low, high = sorted((a, b))
    assert 0 <= parse_size(f"{low}%", total=total) <= parse_size(f"{high}%", total=total) <= total


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0.0),
        (0.25, 0.25),
        (90, 90.0),
        ("0", 0.0),
        ("90", 90.0),
        ("1.5", 1.5),
        (" 90 ", 90.0),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("500ms", 0.5),
        ("250us", 0.00025),
        ("15m", 900.0),
        ("15min", 900.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1 h 30 min 15 s", 5415.0),
        ("2d", 172800.0),
        ("1w", 604800.0),
        ("2 hours", 7200.0),
        ("10sec", 10.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_accepts(text: str | int | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", 'expected a duration like 90, 500ms, 15m or 1h30m (got "")'),
        ("soon", 'expected a duration like 90, 500ms, 15m or 1h30m (got "soon")'),
        ("1x", 'expected a duration like 90, 500ms, 15m or 1h30m (got "1x")'),
        ("1H", 'expected a duration like 90, 500ms, 15m or 1h30m (got "1H")'),
        ("h", 'expected a duration like 90, 500ms, 15m or 1h30m (got "h")'),
        ("1h30", 'expected a duration like 90, 500ms, 15m or 1h30m (got "1h30")'),
        ("1h,30m", 'expected a duration like 90, 500ms, 15m or 1h30m (got "1h,30m")'),
        ("-1", 'a duration must not be negative (got "-1")'),
        ("-5s", 'a duration must not be negative (got "-5s")'),
        (-1, "a duration must not be negative (got -1)"),
        (-0.5, "a duration must not be negative (got -0.5)"),
        (math.inf, "expected a duration like 90, 500ms, 15m or 1h30m (got inf)"),
        (math.nan, "expected a duration like 90, 500ms, 15m or 1h30m (got nan)"),
    ],
)
def test_parse_duration_rejects(text: str | int | float, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == message


def test_parse_duration_rejects_overflow() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9" * 400 + "s")


@pytest.mark.parametrize("value", [True, None, [1]])
def test_parse_duration_wrong_type(value: object) -> None:
    with pytest.raises(TypeError):
        parse_duration(value)  # type: ignore[arg-type]


@given(
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=1000),
    st.integers(min_value=0, max_value=1000),
)
def test_duration_components_add_up(d: int, h: int, m: int, s: int) -> None:
    expected = d * 86400 + h * 3600 + m * 60 + s
    assert parse_duration(f"{d}d{h}h{m}m{s}s") == expected
    assert parse_duration(f"{d}d {h}h {m}m {s}s") == expected


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_milliseconds_are_exact(ms: int) -> None:
    assert parse_duration(f"{ms}ms") == ms / 1000
