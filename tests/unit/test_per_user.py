"""Per-user mode's pieces: the user's paths, the system's backends as fallback, the memory
delegation check, the own-user-only authorizer, ``modeldctl --user`` on local commands."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeld.bus.authorization import Action, Authorizer, Call
from modeld.config import (
    SYSTEM_BACKENDS_DIRS,
    ConfigError,
    load_config,
    system_layout,
    user_layout,
)
from modeld.daemon import _parse_args, layout_for
from modeld.errors import AccessDenied
from modeld.supervisor.footprints import state_directory
from modeld.system.cgroup import CgroupLayout, memory_delegated

HOST = 16 * 1024**3
SERVICE_DIR = Path(__file__).resolve().parents[2] / "service"


def test_the_user_layout_follows_the_xdg_variables() -> None:
    env = {
        "HOME": "/home/u",
        "XDG_CONFIG_HOME": "/cfg",
        "XDG_DATA_HOME": "/data",
        "XDG_STATE_HOME": "/state",
        "XDG_RUNTIME_DIR": "/run/user/1000",
    }
    layout = user_layout(env, uid=1000)
    assert layout.user
    assert layout.config_path == Path("/cfg/modeld/modeld.toml")
    assert layout.models_dir == Path("/cfg/modeld/models.d")
    assert layout.backends_dirs == (Path("/data/modeld/backends"),)
    assert layout.runtime_dir == Path("/run/user/1000/modeld")
    assert layout.state_dir == Path("/state/modeld")
    assert layout.fallback_config == Path("/etc/modeld/modeld.toml")


def test_the_user_layout_defaults_below_home_and_ignores_relative_xdg_paths() -> None:
    layout = user_layout({"HOME": "/home/u", "XDG_CONFIG_HOME": "relative"}, uid=1000)
    assert layout.config_path == Path("/home/u/.config/modeld/modeld.toml")
    assert layout.backends_dirs == (Path("/home/u/.local/share/modeld/backends"),)
    assert layout.state_dir == Path("/home/u/.local/state/modeld")
    assert layout.runtime_dir == Path("/run/user/1000/modeld")


def test_the_system_layout_is_unchanged() -> None:
    layout = system_layout()
    assert not layout.user
    assert layout.config_path == Path("/etc/modeld/modeld.toml")
    assert layout.runtime_dir == Path("/run/modeld")
    assert layout.backends_dirs == SYSTEM_BACKENDS_DIRS
    assert layout.fallback_config is None


def _user(tmp_path: Path, system_file: Path) -> object:
    env = {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path / "run")}
    return dataclasses.replace(user_layout(env, uid=1000), fallback_config=system_file)


def test_a_user_config_comes_from_xdg_config_home_with_the_systems_backends_after_its_own(
    tmp_path: Path,
) -> None:
    system = tmp_path / "etc" / "modeld.toml"
    system.parent.mkdir()
    system.write_text('[daemon]\nbackends_dirs = ["/opt/backends", "more"]\nmax_loaded = 3\n')
    layout = _user(tmp_path, system)
    models = tmp_path / "home" / ".config" / "modeld" / "models.d"
    models.mkdir(parents=True)
    (models / "demo.toml").write_text('backend = "reference"\n')
    config = load_config(None, host_memory=HOST, layout=layout)  # type: ignore[arg-type]
    assert config.source is None
    assert list(config.models) == ["demo"]
    assert config.daemon.models_dir == models
    assert config.daemon.runtime_dir == tmp_path / "run" / "modeld"
    assert config.daemon.max_loaded == 0, "only backends_dirs is taken from the system file"
    assert config.daemon.backends_dirs == (
        tmp_path / "home" / ".local" / "share" / "modeld" / "backends",
        Path("/opt/backends"),
        tmp_path / "etc" / "more",
    )
    own = models.parent / "modeld.toml"
    own.write_text('[daemon]\nmax_loaded = 1\nbackends_dirs = ["mine"]\n')
    config = load_config(None, host_memory=HOST, layout=layout)  # type: ignore[arg-type]
    assert config.source == own
    assert config.daemon.max_loaded == 1
    assert config.daemon.backends_dirs == (models.parent / "mine",), "set: no fallback"


def test_without_a_system_file_the_system_backends_are_the_fallback(tmp_path: Path) -> None:
    layout = _user(tmp_path, tmp_path / "absent.toml")
    config = load_config(None, host_memory=HOST, layout=layout)  # type: ignore[arg-type]
    assert config.daemon.backends_dirs[1:] == SYSTEM_BACKENDS_DIRS


def test_a_malformed_system_file_is_an_error_naming_it(tmp_path: Path) -> None:
    system = tmp_path / "modeld.toml"
    system.write_text("[daemon]\nbackends_dirs = 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(None, host_memory=HOST, layout=_user(tmp_path, system))  # type: ignore[arg-type]
    assert str(err.value).startswith(f"{system}: daemon.backends_dirs: expected an array")


def test_the_state_directory_defaults_to_the_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert state_directory(Path("/home/u/.local/state/modeld")) == Path(
        "/home/u/.local/state/modeld"
    )
    monkeypatch.setenv("STATE_DIRECTORY", "/from/systemd")
    assert state_directory(Path("/home/u/.local/state/modeld")) == Path("/from/systemd")


def test_modeld_user_selects_the_user_layout() -> None:
    assert layout_for(_parse_args(["--user"])).user
    assert not layout_for(_parse_args([])).user


# -- memory delegation ------------------------------------------------------------------

MANAGER = "/user.slice/user-1000.slice/user@1000.service"


def test_memory_is_delegated_on_v2_when_the_managers_cgroup_has_the_controller(
    tmp_path: Path,
) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    manager = tmp_path / MANAGER.lstrip("/")
    manager.mkdir(parents=True)
    (manager / "cgroup.controllers").write_text("cpu memory pids\n")
    assert memory_delegated(MANAGER, tmp_path)
    (manager / "cgroup.controllers").write_text("pids\n")
    assert not memory_delegated(MANAGER, tmp_path)
    assert not memory_delegated("/user.slice/gone.service", tmp_path)


def test_memory_on_v1_needs_a_memory_cgroup_this_user_may_write(tmp_path: Path) -> None:
    assert not memory_delegated(MANAGER, tmp_path), "no memory cgroup for the manager"
    (tmp_path / "memory" / MANAGER.lstrip("/")).mkdir(parents=True)
    assert memory_delegated(MANAGER, tmp_path) == os.access(
        tmp_path / "memory" / MANAGER.lstrip("/"), os.W_OK
    )


def test_without_the_memory_controller_nothing_is_read(tmp_path: Path) -> None:
    scope = tmp_path / "memory" / "modeld.slice" / "s.scope"
    scope.mkdir(parents=True)
    (scope / "memory.usage_in_bytes").write_text("999\n")
    (scope / "memory.oom_control").write_text("oom_kill 1\n")
    assert CgroupLayout.detect(tmp_path).memory_current("/modeld.slice/s.scope") == 999
    layout = CgroupLayout.detect(tmp_path, memory=False)
    assert layout.memory_current("/modeld.slice/s.scope") is None
    assert layout.memory_peak("/modeld.slice/s.scope") is None
    assert not layout.in_oom("/modeld.slice/s.scope")


# -- authorization -----------------------------------------------------------------------


class FixedUid(Authorizer):
    def __init__(self, uid: int, *, own_user_only: bool) -> None:
        super().__init__(bus=None, own_user_only=own_user_only)  # type: ignore[arg-type]
        self.uid = uid

    async def uid_of(self, sender: str) -> int:
        return self.uid


def test_a_per_user_modeld_lets_only_its_own_user_change_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 1000)  # modeld runs as uid 1000

    async def check(uid: int, own_user_only: bool) -> str | None:
        try:
            authorizer = FixedUid(uid, own_user_only=own_user_only)
            await authorizer.authorize(Action.USE, Call(sender=":1.7", what="Load x"))
        except AccessDenied as err:
            return str(err)
        return None

    assert asyncio.run(check(1000, True)) is None
    for caller in (0, 1001):
        denied = asyncio.run(check(caller, True))
        assert denied is not None, f"uid {caller} was let in: no polkit, the own user only"
        assert "per-user modeld of uid 1000" in denied
    assert asyncio.run(check(0, False)) is None, "the system instance lets root in"


# -- modeldctl --user on local commands --------------------------------------------------


def _modeldctl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modeld.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_modeldctl_user_checks_the_users_configuration(tmp_path: Path) -> None:
    models = tmp_path / "cfg" / "modeld" / "models.d"
    models.mkdir(parents=True)
    (models / "mine.toml").write_text('backend = "reference"\n')
    env = dict(
        os.environ,
        PYTHONPATH=str(SERVICE_DIR),
        HOME=str(tmp_path),
        XDG_CONFIG_HOME=str(tmp_path / "cfg"),
        XDG_DATA_HOME=str(tmp_path / "data"),
    )
    result = _modeldctl("--user", "--json", "config", "check", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["models"] == ["mine"]
    result = _modeldctl("backends", "--user", "--json", env=env)
    assert result.returncode == 0, result.stderr
    dirs = json.loads(result.stdout)["backends_dirs"]
    assert dirs[0] == str(tmp_path / "data" / "modeld" / "backends")


def test_modeldctl_user_logs_reads_the_user_journal(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    journalctl = bin_dir / "journalctl"
    journalctl.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    journalctl.chmod(0o755)
    env = dict(os.environ, PYTHONPATH=str(SERVICE_DIR), PATH=f"{bin_dir}:/usr/bin:/bin")
    result = _modeldctl("logs", "--user", "demo", env=env)
    assert result.stdout.splitlines()[:2] == ["--user", "MODELD_MODEL=demo"]
