"""The man pages (docs/man/*.rst) cannot fall behind the code.

Every configuration key the loader accepts, every modeldctl command and option, every
modeld option, and every member, error and polkit action of the D-Bus API is named in its
page; the shipped /etc/modeld/modeld.toml mentions every daemon key; the pages build into
roff without a docutils warning.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from modeld import __version__, config, errors
from modeld.bus import authorization
from modeld.bus.api import PROPERTIES
from modeld.bus.service import ManagerInterface, ModelInterface
from modeld.cli.main import build_parser
from modeld.daemon import _parse_args
from modeld.naming import MANAGER_INTERFACE, MODEL_INTERFACE

REPO = Path(__file__).resolve().parents[2]
MAN = REPO / "docs" / "man"


def section(page: str, title: str) -> str:
    """The text of one top-level section (an all-caps title underlined with ``=``)."""
    text = (MAN / page).read_text()
    match = re.search(
        rf"^{re.escape(title)}\n=+\n(.*?)(?=^[A-Z][A-Z .()-]+\n=+\n|\Z)", text, re.M | re.S
    )
    assert match, f"{page} has no section {title}"
    return match.group(1)


def literals(text: str) -> set[str]:
    return set(re.findall(r"``([^`]+)``", text))


def strong(text: str) -> set[str]:
    return set(re.findall(r"\*\*([^*]+)\*\*", text))


def test_every_daemon_key_is_documented() -> None:
    documented = literals(section("modeld.toml.5.rst", "THE DAEMON FILE"))
    assert set(config._DAEMON_KEYS) <= documented, set(config._DAEMON_KEYS) - documented


def test_every_model_key_is_documented() -> None:
    documented = literals(section("modeld.toml.5.rst", "MODEL FILES"))
    keys = {"[options]" if k == "options" else k for k in config._MODEL_KEYS}
    assert keys <= documented, keys - documented


def test_the_shipped_daemon_file_shows_every_key() -> None:
    text = (REPO / "packaging" / "config" / "modeld.toml").read_text()
    shown = set(re.findall(r"^#?([a-z_]+) = ", text, re.M))
    assert set(config._DAEMON_KEYS) <= shown, set(config._DAEMON_KEYS) - shown


def _commands(
    parser: argparse.ArgumentParser, prefix: str = ""
) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_commands(sub, prefix + name + " "))
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for a in parser._actions for opt in a.option_strings}


def test_every_modeldctl_command_and_option_is_documented() -> None:
    parser = build_parser()
    commands = section("modeldctl.1.rst", "COMMANDS")
    named = strong(commands)
    found = _commands(parser)
    assert found, "no modeldctl commands found"
    for name, sub in found.items():
        if _commands(sub):
            continue  # a group such as "config": its subcommands are listed
        assert name in named, f"modeldctl {name} is not in modeldctl(1)"
    page = (MAN / "modeldctl.1.rst").read_text()
    everything = _options(parser).union(*(_options(sub) for sub in found.values()))
    missing = {opt for opt in everything if f"**{opt}**" not in page}
    assert not missing, f"options missing from modeldctl(1): {sorted(missing)}"


def test_every_modeld_option_is_documented() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        _parse_args(["--help"])
    options = set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", out.getvalue()))
    assert {"--config", "--version"} <= options
    page = section("modeld.8.rst", "OPTIONS")
    missing = {opt for opt in options if f"**{opt}**" not in page}
    assert not missing, f"options missing from modeld(8): {sorted(missing)}"


def _members(cls: type, marker: str) -> set[str]:
    return {name for name, value in vars(cls).items() if marker in getattr(value, "__dict__", {})}


@pytest.mark.parametrize(
    ("cls", "interface", "title"),
    [
        (ManagerInterface, MANAGER_INTERFACE, "MANAGER INTERFACE"),
        (ModelInterface, MODEL_INTERFACE, "MODEL INTERFACE"),
    ],
)
def test_every_dbus_member_is_documented(cls: type, interface: str, title: str) -> None:
    named = strong(section("org.modeld1.5.rst", title))
    members = (
        _members(cls, "__DBUS_METHOD") | _members(cls, "__DBUS_SIGNAL") | set(PROPERTIES[interface])
    )
    assert _members(cls, "__DBUS_METHOD"), "found no methods: the marker changed?"
    assert members <= named, members - named


def test_every_dbus_error_and_polkit_action_is_documented() -> None:
    page = (MAN / "org.modeld1.5.rst").read_text()
    names = {
        cls.dbus_name
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ModeldError)
    }
    assert "org.modeld1.Error.NoSuchModel" in names
    assert {n for n in names if f"**{n}**" not in page} == set()
    policy = ET.parse(REPO / "systemd" / "org.modeld1.policy").getroot()
    actions = {a.get("id") for a in policy.iter("action")} | {a.value for a in authorization.Action}
    assert {a for a in actions if f"**{a}**" not in page} == set()


def test_the_pages_build_without_warnings(tmp_path: Path) -> None:
    python = shutil.which("python3", path="/usr/bin")
    probe = python and subprocess.run([python, "-c", "import docutils"], check=False).returncode
    if not python or probe:
        pytest.skip("Debian's python3-docutils is not installed (scripts/setup installs it)")
    out = subprocess.run(
        [python, str(MAN / "build.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env={"SOURCE_DATE_EPOCH": "1796000000", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == ["modeld.8", "modeld.toml.5", "modeldctl.1", "org.modeld1.5"]
    roff = (tmp_path / "modeld.8").read_text()
    assert f'.TH "MODELD" 8 "2026-11-30" "modeld {__version__}"' in roff  # reproducible


def test_every_unit_points_at_the_man_pages() -> None:
    units = [
        p
        for p in [*REPO.glob("systemd/*"), *REPO.glob("systemd/user/*")]
        if p.suffix in (".service", ".socket", ".slice") and not p.name.startswith("org.")
    ]
    assert len(units) >= 6
    for unit in units:
        lines = unit.read_text().splitlines()
        docs = [line for line in lines if line.startswith("Documentation=")]
        assert docs and "man:modeld(8)" in docs[0], unit
