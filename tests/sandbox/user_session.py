"""A user's systemd manager (``user@UID.service``) and session bus inside a sandbox.

The sandbox's root is the host's, read-only: the test user exists only in the sandbox's mount
namespace, through copies of ``/etc/passwd``, ``/etc/group`` and ``/etc/shadow`` (one line,
no password: PAM's account check needs it) bound over the originals. There is no logind, so
``user@.service`` gets ``XDG_RUNTIME_DIR`` from a drop-in (pam_systemd would set it), and
``user-runtime-dir@.service`` creates ``/run/user/UID``. The session bus is Debian's user
``dbus.socket`` (package ``dbus-user-session``).

A :class:`UserSession` stands in for a :class:`~sandbox.fixture.Sandbox` where
:class:`~sandbox.deploy.Modeld` talks to systemd and D-Bus: ``systemctl``/``busctl`` run
``--user`` as the test user inside, ``run_dir`` is the user's ``$XDG_RUNTIME_DIR`` seen from
the host (through ``/proc/PID/root``), ``exec`` runs as root inside.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .fixture import Sandbox

TEST_UID = 4242
TEST_USER = "modeldtest"
SYSTEM_UNITS = Path("/lib/systemd/system")


@dataclass
class UserSession:
    """The user manager of ``uid`` in ``sandbox``; ``home`` is a host path under /tmp."""

    sandbox: Sandbox
    uid: int
    home: Path

    @property
    def runtime_dir(self) -> str:
        """``$XDG_RUNTIME_DIR`` inside the sandbox."""
        return f"/run/user/{self.uid}"

    @property
    def run_dir(self) -> Path:
        """The host path of ``$XDG_RUNTIME_DIR`` (its sockets can be connected to)."""
        return Path(f"/proc/{self.sandbox.systemd_pid}/root{self.runtime_dir}")

    @property
    def unit_dir(self) -> Path:
        """Host path of the sandbox's /run/systemd/user (in every user manager's unit path)."""
        return self.sandbox.run_dir / "systemd" / "user"

    def as_user(self, *cmd: str | os.PathLike[str]) -> list[str]:
        """argv running ``cmd`` as the user, with the environment of its session."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.uid}",
            "--clear-groups",
            "env",
            "-i",
            f"HOME={self.home}",
            f"USER={TEST_USER}",
            "PATH=/usr/local/bin:/usr/bin:/bin",
            f"XDG_RUNTIME_DIR={self.runtime_dir}",
            f"DBUS_SESSION_BUS_ADDRESS=unix:path={self.runtime_dir}/bus",
            *(os.fspath(c) for c in cmd),
        ]

    def run(
        self, *cmd: str | os.PathLike[str], check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` as the user inside the sandbox."""
        return self.sandbox.exec(*self.as_user(*cmd), check=check, timeout=timeout)

    def exec(
        self, *cmd: str | os.PathLike[str], check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` as root inside the sandbox (ps and the like)."""
        return self.sandbox.exec(*cmd, check=check, timeout=timeout)

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl --user`` as the user."""
        return self.run("systemctl", "--user", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def busctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``busctl --user`` as the user, on its session bus."""
        return self.run("busctl", "--user", "--no-pager", *args, check=check, timeout=timeout)

    def install_unit(self, name: str, text: str) -> None:
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        (self.unit_dir / name).write_text(text)

    def install_dropin(self, unit: str, name: str, text: str) -> None:
        directory = self.unit_dir / f"{unit}.d"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.conf").write_text(text)

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def chown_home(self) -> None:
        """Give everything under ``home`` to the user (files the test wrote as root)."""
        for path in [self.home, *self.home.rglob("*")]:
            os.lchown(path, self.uid, self.uid)


def _bind_over(sandbox: Sandbox, source: Path, target: str) -> None:
    sandbox.exec("mount", "--bind", str(source), target)


def _add_account(sandbox: Sandbox, uid: int, home: Path) -> None:
    """The test user in the sandbox's /etc/passwd, /etc/group and /etc/shadow."""
    etc = sandbox.base / "user-etc"
    etc.mkdir(exist_ok=True)
    passwd = Path("/etc/passwd").read_text()
    group = Path("/etc/group").read_text()
    (etc / "passwd").write_text(f"{passwd}{TEST_USER}:x:{uid}:{uid}::{home}:/bin/sh\n")
    (etc / "group").write_text(f"{group}{TEST_USER}:x:{uid}:\n")
    shadow = etc / "shadow"
    shadow.write_text(f"{TEST_USER}:*:19000:0:99999:7:::\n")
    shadow.chmod(0o600)
    for name in ("passwd", "group", "shadow"):
        _bind_over(sandbox, etc / name, f"/etc/{name}")


def _make_reachable(sandbox: Sandbox, executable: str) -> None:
    """Let any user reach ``executable`` inside the sandbox.

    A Python installed under a private home (``/root/.pyenv/...`` behind a 0700 ``/root``)
    cannot be run by the test user. The topmost directory on its path that others may not
    search is covered, in the sandbox's mount namespace only, by a tmpfs holding just the
    next directory on the path, bound back in. Everything below that must be searchable.
    """
    real = Path(os.path.realpath(executable))
    for parent in reversed(real.parents):
        if parent == Path("/") or os.stat(parent).st_mode & stat.S_IXOTH:
            continue
        child = real.relative_to(parent).parts[0]
        keep = f"/run/harness/reach-{parent.name}"
        sandbox.exec("mkdir", "-p", keep)
        sandbox.exec("mount", "--bind", str(parent / child), keep)
        sandbox.exec("mount", "-t", "tmpfs", "-o", "mode=0755,size=64k", "tmpfs", str(parent))
        sandbox.exec("mkdir", str(parent / child))
        sandbox.exec("mount", "--bind", keep, str(parent / child))
        return


# systemd never hands a v1 controller hierarchy to an unprivileged manager; a user manager
# uses the v1 memory controller when its memory cgroup is writable to it when it starts.
_V1_MEMORY_DELEGATION = (
    "[Service]\nExecStartPre=+/bin/chown -R %i:%i "
    "/sys/fs/cgroup/memory/user.slice/user-%i.slice/user@%i.service\n"
)


def start_user_session(
    sandbox: Sandbox,
    home: Path,
    uid: int = TEST_UID,
    *,
    python: str = sys.executable,
    delegate_v1_memory: bool = False,
) -> UserSession:
    """Create the test user, start ``user@UID.service`` and wait for its session bus.

    ``home`` (a host directory under /tmp, shared with the sandbox) becomes the user's home;
    ``python`` is made reachable for the user. Changes only the sandbox's mount namespace.
    ``delegate_v1_memory``: on a v1/hybrid host, give the user manager its memory cgroup (what
    cgroup v2 does by default), so that memory limits on its units apply.
    """
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o755)
    _add_account(sandbox, uid, home)
    _make_reachable(sandbox, python)
    for unit in ("user@.service", "user-runtime-dir@.service"):
        sandbox.install_unit(unit, (SYSTEM_UNITS / unit).read_text(), reload=False)
    sandbox.install_dropin(
        "user@.service",
        "50-runtime-dir",
        "[Service]\nEnvironment=XDG_RUNTIME_DIR=/run/user/%i\n",
        reload=False,
    )
    if delegate_v1_memory and sandbox.cgroup_mode != "v2":
        sandbox.install_dropin("user@.service", "50-memory", _V1_MEMORY_DELEGATION, reload=False)
    sandbox.daemon_reload()
    session = UserSession(sandbox, uid, home)
    session.chown_home()
    sandbox.systemctl("start", f"user@{uid}.service")
    return session


def stop_user_session(session: UserSession) -> None:
    """Stop the user manager (and with it everything it runs); remove the home."""
    session.sandbox.systemctl("stop", f"user@{session.uid}.service", check=False)
    shutil.rmtree(session.unit_dir, ignore_errors=True)
    shutil.rmtree(session.home, ignore_errors=True)


def user_units(names: Sequence[str], repo: Path) -> dict[str, str]:
    """The repository's user units (``systemd/user/NAME``) by name."""
    return {name: (repo / "systemd" / "user" / name).read_text() for name in names}
