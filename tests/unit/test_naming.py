"""Names derived from model names stay valid and distinct."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from modeld.naming import (
    backend_socket,
    bus_path_escape,
    bus_path_unescape,
    model_object_path,
    parse_scope_name,
    scope_name,
    unit_escape,
)

PATH_ELEMENT = re.compile(r"^[A-Za-z0-9_]+$")


def test_examples_follow_systemd_rules() -> None:
    assert bus_path_escape("demo") == "demo"
    assert bus_path_escape("my model") == "my_20model"
    assert bus_path_escape("") == "_"
    assert unit_escape("a-b") == "a\\x2db"
    assert unit_escape("a/b") == "a-b"
    assert unit_escape(".hidden") == "\\x2ehidden"
    assert unit_escape("héllo") == "h\\xc3\\xa9llo"
    assert scope_name("demo", 3) == "modeld-backend-demo-3.scope"
    assert model_object_path("ü") == "/org/modeld1/model/_c3_bc"


@given(st.text(min_size=1, max_size=300))
def test_bus_path_round_trip(name: str) -> None:
    escaped = bus_path_escape(name)
    assert PATH_ELEMENT.match(escaped)
    assert bus_path_unescape(escaped) == name


@given(st.text(min_size=1, max_size=300), st.integers(min_value=1, max_value=10**6))
def test_scope_names_are_valid_and_parse_back(name: str, generation: int) -> None:
    unit = scope_name(name, generation)
    assert len(unit) <= 255
    assert all(0x20 < ord(c) < 0x7F for c in unit)
    parsed = parse_scope_name(unit)
    assert parsed is not None
    assert parsed == (unit_escape(name), generation)


@given(st.text(min_size=1, max_size=300))
def test_socket_paths_are_short_and_private(name: str) -> None:
    from pathlib import Path

    path = backend_socket(Path("/run/modeld"), name)
    assert path.parent.parent == Path("/run/modeld/backends")
    assert path.name == "backend.sock"
    assert "/" not in path.parent.name and path.parent.name not in ("", ".", "..")
    longest_user_runtime = Path("/run/user/4294967294/modeld")  # modeld --user
    assert len(str(backend_socket(longest_user_runtime, name))) < 107


def test_distinct_long_names_get_distinct_units() -> None:
    a, b = "x" * 400 + "a", "x" * 400 + "b"
    assert unit_escape(a) != unit_escape(b)
    assert backend_socket(__import__("pathlib").Path("/r"), a) != backend_socket(
        __import__("pathlib").Path("/r"), b
    )


def test_shown_cuts_long_names_short() -> None:
    from modeld.naming import shown

    assert shown("demo") == "'demo'"
    long = shown("x" * 300_000)
    assert len(long) < 200 and long.endswith("… (300000 characters)")
