"""Python side of the systemd sandbox: boot one with ``boot-systemd.sh run``, talk to it, stop it.

A :class:`Sandbox` is a real systemd (PID 1 of new namespaces) with its own D-Bus system bus and
journald; see ``boot-systemd.sh`` for what is isolated and how.  Boot one with
:func:`booted_sandbox` (a context manager) or :meth:`Sandbox.boot` + :meth:`Sandbox.stop`.
The runner script is our child: closing its stdin (or our death) stops the instance, and the
namespace is tied to the runner by PDEATHSIG, so nothing outlives the test session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

SCRIPT = Path(__file__).resolve().with_name("boot-systemd.sh")
SYSTEMD_BIN = "/lib/systemd/systemd"
NS_BUS_ADDRESS = "unix:path=/run/dbus/system_bus_socket"  # the bus as seen inside
BOOT_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
_TOOLS = ("unshare", "nsenter", "setpriv", "busctl", "journalctl", "flock", "dbus-daemon")
POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_UNIT = Path("/lib/systemd/system/polkit.service")
POLKIT_ACTIONS = "/usr/share/polkit-1/actions"
POLKIT_RULES = "/etc/polkit-1/rules.d"
_names = itertools.count()


class SandboxError(RuntimeError):
    """The sandbox failed to boot or to stop cleanly."""


class CommandError(subprocess.CalledProcessError):
    """A command run by the sandbox helpers failed; the message carries its output."""

    def __str__(self) -> str:
        text = super().__str__()
        for label, out in (("stdout", self.stdout), ("stderr", self.stderr)):
            if out:
                text += f"\n--- {label}:\n{str(out).rstrip()[-4000:]}"
        return text


def missing_prerequisites() -> str | None:
    """Why a sandbox cannot be booted here, or None if it can (as far as can be told)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root (the systemd sandbox needs real root)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if not os.access(SYSTEMD_BIN, os.X_OK):
        missing.append(SYSTEMD_BIN)
    if missing:
        return "missing: " + ", ".join(missing)
    return None


def polkit_missing() -> str | None:
    """Why the real polkitd cannot run in a sandbox here (package polkitd), or None."""
    missing = [str(p) for p in (POLKITD, POLKIT_UNIT) if not p.exists()]
    return "missing: " + ", ".join(missing) if missing else None


def default_name() -> str:
    """A name unique to this process (and xdist worker): ``pt<pid>-<worker>-<n>``."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return f"pt{os.getpid()}-{worker}-{next(_names)}"


def _run(
    argv: Sequence[str],
    *,
    check: bool,
    input: str | None = None,
    timeout: float | None = 30.0,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        check=False,
    )
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


class Sandbox:
    """One booted instance.  Paths are host paths; PIDs inside are namespace PIDs."""

    _live: ClassVar[list[Sandbox]] = []

    def __init__(
        self,
        info: Mapping[str, str],
        proc: subprocess.Popen[bytes],
        stderr: Any,
        stop_timeout: float,
    ) -> None:
        self.info = dict(info)
        self.name = info["NAME"]
        self.base = Path(info["BASE"])
        self.run_dir = Path(info["RUN_DIR"])
        self.bus_address = info["DBUS_SYSTEM_BUS_ADDRESS"]
        self.journal_dir = Path(info["JOURNAL_DIR"])
        self.systemd_pid = int(info["SYSTEMD_PID"])
        self.netns = info.get("NETNS") == "1"
        self.cgroup_mode = info["CGROUP_MODE"]  # "v1-hybrid" | "v2"
        self.memcg_dir = Path(info["MEMCG_DIR"])
        self.cgroups = [Path(p) for p in info["CGROUPS"].split(":") if p]
        self.boot_ms = int(info["BOOT_MS"])
        self.boot_breakdown = info["BOOT_BREAKDOWN_MS"]
        self.stop_ms: int | None = None
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = proc
        self._stderr = stderr
        self._installed: list[str] = []

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    def boot(
        cls,
        name: str | None = None,
        *,
        dbus_policy_files: Iterable[str | os.PathLike[str]] | None = None,
        dbus_service_dirs: Iterable[str | os.PathLike[str]] | None = None,
        units_dir: str | os.PathLike[str] | None = None,
        netns: bool = False,
        root: str | os.PathLike[str] | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> Sandbox:
        """Boot an instance with ``boot-systemd.sh run NAME``.  Must run in the main thread.

        ``dbus_policy_files`` / ``dbus_service_dirs``: None means the environment variables
        DBUS_POLICY_FILES / DBUS_SERVICE_DIRS (':'-separated) as they are.
        ``root``: boot this directory (a whole Debian root with systemd and dbus) as ``/``
        (boot-systemd.sh's ROOT_DIR mode): its own units, bus configuration and default
        target; the host's files are not visible inside.
        """
        if threading.current_thread() is not threading.main_thread():
            # PDEATHSIG fires when the parent *thread* ends: whatever is tied to us that
            # way must come from the thread that lives as long as the session
            raise SandboxError("boot the sandbox from the main thread")
        reason = missing_prerequisites()
        if reason:
            raise SandboxError(reason)
        name = name or default_name()
        env = dict(
            os.environ,
            BOOT_TIMEOUT=str(int(boot_timeout)),
            STOP_TIMEOUT=str(int(stop_timeout)),
            NETNS="1" if netns else "0",
        )
        if dbus_policy_files is not None:
            env["DBUS_POLICY_FILES"] = ":".join(os.fspath(p) for p in dbus_policy_files)
        if dbus_service_dirs is not None:
            env["DBUS_SERVICE_DIRS"] = ":".join(os.fspath(p) for p in dbus_service_dirs)
        if units_dir is not None:
            env["UNITS_DIR"] = os.fspath(units_dir)
        if root is not None:
            env["ROOT_DIR"] = os.fspath(root)
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the sandbox
        # own session: a terminal's ^C reaches pytest only, which then stops us in order
        proc = subprocess.Popen(
            [str(SCRIPT), "run", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            start_new_session=True,
            bufsize=0,
        )
        try:
            info = cls._read_info(proc, boot_timeout + 15)
        except BaseException:
            cls._abort(proc, name)
            stderr.close()
            raise
        if "BOOT_BREAKDOWN_MS" not in info:  # the runner gave up (and cleaned up) or hangs
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=stop_timeout + 10)
            cls._abort(proc, name)
            stderr.seek(0)
            err = stderr.read().decode(errors="replace")
            stderr.close()
            raise SandboxError(
                f"sandbox {name} failed to boot (rc={proc.returncode}):\n" + err.rstrip()
            )
        sb = cls(info, proc, stderr, stop_timeout)
        cls._live.append(sb)
        return sb

    @staticmethod
    def _read_info(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, str]:
        """KEY=VALUE lines from the runner until BOOT_BREAKDOWN_MS (or EOF = failure)."""
        assert proc.stdout is not None
        fd, buf, info = proc.stdout.fileno(), b"", {}
        deadline = time.monotonic() + timeout
        while "BOOT_BREAKDOWN_MS" not in info:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxError(f"no boot report from boot-systemd.sh within {timeout:.0f}s")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                key, sep, value = line.decode(errors="replace").partition("=")
                if sep:
                    info[key] = value
        return info

    @staticmethod
    def _abort(proc: subprocess.Popen[bytes], name: str) -> None:
        """Kill the runner (PDEATHSIG takes the namespace down), then clean up on disk."""
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f:
                f.close()
        _run([str(SCRIPT), "stop", name], check=False, timeout=STOP_TIMEOUT + 10)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Close the runner's stdin and wait for the graceful stop; SIGKILL as a fallback.

        Raises SandboxError if the stop was not clean or anything is left behind.
        Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ValueError):
            self._live.remove(self)
        problems = []
        try:
            out, _ = proc.communicate(timeout=self.stop_timeout + 10)
        except subprocess.TimeoutExpired:
            problems.append(f"runner did not stop within {self.stop_timeout + 10:.0f}s: killed")
            self._abort(proc, self.name)
            out = b""
        for line in out.decode(errors="replace").splitlines():
            if line.startswith("STOP_MS="):
                self.stop_ms = int(line.split("=", 1)[1])
        if proc.returncode != 0:
            if not problems:
                problems.append(f"runner exit status {proc.returncode}")
            if self.base.exists():  # the runner died early: clean up what it left
                _run([str(SCRIPT), "stop", self.name], check=False, timeout=STOP_TIMEOUT + 10)
        left = self.leftovers()
        if left:
            problems.append("left behind: " + ", ".join(left))
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace").rstrip()
        self._stderr.close()
        if problems:
            raise SandboxError(f"sandbox {self.name}: " + "; ".join(problems) + f"\n{err}")

    def leftovers(self) -> list[str]:
        """Host paths of this instance that still exist (dir, dedicated cgroups)."""
        return [str(p) for p in [self.base, *self.cgroups] if p.exists()]

    # ------------------------------------------------------------ inside the namespace
    def ns_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for processes run inside: the bus is the namespace's system bus."""
        return dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=NS_BUS_ADDRESS, **(extra or {}))

    def nsenter_argv(self, *cmd: str | os.PathLike[str]) -> list[str]:
        """argv that runs cmd in the namespaces of the instance (mount, pid, uts, ipc, cgroup)."""
        argv = ["nsenter", "-t", str(self.systemd_pid), "-m", "-p", "-u", "-i", "-C"]
        if self.netns:
            argv.append("-n")
        return [*argv, "--", *(os.fspath(c) for c in cmd)]

    def exec(
        self,
        *cmd: str | os.PathLike[str],
        check: bool = True,
        input: str | None = None,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run cmd inside (text mode, output captured).  Its PID is a namespace PID; the
        process stays in the caller's cgroup (outside the instance's tree)."""
        return _run(
            self.nsenter_argv(*cmd), check=check, input=input, timeout=timeout, env=self.ns_env(env)
        )

    def popen(
        self, *cmd: str | os.PathLike[str], env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start cmd inside without waiting.  ``.pid`` is the host PID of nsenter, which
        forks cmd: let cmd report its own (namespace) PID, or use :meth:`ns_pid`.  Killing
        nsenter does not kill cmd: stop it through systemd or by its host PID."""
        return subprocess.Popen(self.nsenter_argv(*cmd), env=self.ns_env(env), **kwargs)

    @staticmethod
    def ns_pid(host_pid: int) -> int:
        """The PID a host process has in its innermost PID namespace (NSpid)."""
        for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        raise LookupError(f"no NSpid for {host_pid}")

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        return self.exec("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        """``systemctl show -p PROP --value UNIT``."""
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def daemon_reload(self) -> None:
        self.systemctl("daemon-reload")

    def wait_unit(self, unit: str, prop: str, value: str, timeout: float = 10.0) -> None:
        """Wait until ``show(unit, prop) == value``; raise TimeoutError with the last value."""
        deadline = time.monotonic() + timeout
        while True:
            last = self.show(unit, prop)
            if last == value:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{unit}: {prop}={last!r}, wanted {value!r} within {timeout}s")
            time.sleep(0.05)

    # ---------------------------------------------------------------- units
    @property
    def unit_dir(self) -> Path:
        """Host path of the instance's /run/systemd/system (first in its unit path)."""
        return self.run_dir / "systemd" / "system"

    def install_unit(self, name: str, text: str, *, reload: bool = True) -> Path:
        """Write a unit file into /run/systemd/system, then daemon-reload."""
        path = self.unit_dir / name
        path.write_text(text)
        self._installed.append(name)
        if reload:
            self.daemon_reload()
        return path

    def install_dropin(self, unit: str, name: str, text: str, *, reload: bool = True) -> Path:
        """Write /run/systemd/system/UNIT.d/NAME.conf, then daemon-reload."""
        d = self.unit_dir / f"{unit}.d"
        d.mkdir(exist_ok=True)
        path = d / (name if name.endswith(".conf") else f"{name}.conf")
        path.write_text(text)
        if reload:
            self.daemon_reload()
        return path

    def installed_units(self) -> list[str]:
        """Names passed to install_unit so far, in order."""
        return list(self._installed)

    def remove_units(self, names: Iterable[str]) -> None:
        """Stop units, reset their failed state, delete their files and drop-ins, reload."""
        names = list(dict.fromkeys(names))
        if not names:
            return
        self.systemctl("stop", *names, check=False)
        self.systemctl("reset-failed", *names, check=False)
        for name in names:
            (self.unit_dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.unit_dir / f"{name}.d", ignore_errors=True)
            with contextlib.suppress(ValueError):
                self._installed.remove(name)
        self.daemon_reload()

    # ---------------------------------------------------------------- D-Bus
    def env(self) -> dict[str, str]:
        """os.environ with DBUS_SYSTEM_BUS_ADDRESS set to the instance's bus (host clients)."""
        return dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=self.bus_address)

    def busctl(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """``busctl --system ARGS`` on the host, against the instance's bus."""
        return _run(
            ["busctl", "--system", "--no-pager", *args],
            check=check,
            timeout=timeout,
            env=self.env(),
        )

    def add_dbus_policy(self, name: str, text: str) -> Path:
        """Add a bus policy file at runtime (/run/harness/dbus/system.d) and ReloadConfig."""
        path = (
            self.run_dir
            / "harness"
            / "dbus"
            / "system.d"
            / (name if name.endswith(".conf") else f"{name}.conf")
        )
        path.write_text(text)
        self.busctl(
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "ReloadConfig",
        )
        return path

    # ---------------------------------------------------------------- polkit
    def setup_polkit(self, actions: Iterable[str | os.PathLike[str]], rules_dir: Path) -> None:
        """Give polkitd its files inside the instance (before :meth:`start_polkit`).

        The distro's actions plus the policy files ``actions`` are bind-mounted (inside the
        instance's mount namespace only) over /usr/share/polkit-1/actions, and
        ``rules_dir`` (a host directory under /tmp, which the instance shares) over
        /etc/polkit-1/rules.d. polkitd runs as its own user: both are made readable to it.
        """
        staged = self.base / "polkit-actions"
        staged.mkdir(exist_ok=True)
        for policy in [*Path(POLKIT_ACTIONS).glob("*.policy"), *map(Path, actions)]:
            shutil.copyfile(policy, staged / policy.name)
        for directory in (staged, rules_dir):
            directory.chmod(0o755)
        self.exec("mount", "--bind", str(staged), POLKIT_ACTIONS)
        self.exec("mount", "--bind", str(rules_dir), POLKIT_RULES)

    def start_polkit(self) -> None:
        """Run the distro's polkit.service (the real polkitd) on the instance's bus."""
        self.install_unit("polkit.service", POLKIT_UNIT.read_text())
        self.systemctl("start", "polkit.service")

    def stop_polkit(self) -> None:
        """Stop polkitd and remove its unit, so that no bus activation brings it back."""
        self.remove_units(["polkit.service"])

    # ---------------------------------------------------------------- logs
    def journal(
        self, unit: str | None = None, identifier: str | None = None, lines: int | None = None
    ) -> str:
        """The instance's journal, read from the host (``journalctl -D ... -o cat``)."""
        argv = ["journalctl", "-D", str(self.journal_dir), "--no-pager", "-o", "cat"]
        if unit:
            argv += ["-u", unit]
        if identifier:
            argv += ["-t", identifier]
        if lines is not None:
            argv += ["-n", str(lines)]
        proc = _run(argv, check=False)
        return proc.stdout + (proc.stderr if proc.returncode else "")

    # ---------------------------------------------------------------- cgroups
    def memcg_path(self, control_group: str) -> Path:
        """Host path of the memory cgroup of a unit, from its ControlGroup property (which
        is relative to the instance's cgroup namespace).  v1-hybrid: below the dedicated
        cgroup in the v1 memory hierarchy; v2: below the dedicated cgroup2 directory."""
        return self.memcg_dir / control_group.lstrip("/")

    def memory_max(self, control_group: str) -> int | None:
        """The memory limit of a cgroup in bytes (None = unlimited), v1 or v2 file."""
        d = self.memcg_path(control_group)
        if self.cgroup_mode == "v2":
            raw = (d / "memory.max").read_text().strip()
            return None if raw == "max" else int(raw)
        value = int((d / "memory.limit_in_bytes").read_text())
        return None if value >= 2**62 else value

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Sandbox {self.name} pid={self.systemd_pid} {state}>"


def live_sandboxes() -> list[Sandbox]:
    """Instances booted in this process and not stopped yet."""
    return list(Sandbox._live)


@contextlib.contextmanager
def booted_sandbox(name: str | None = None, **kwargs: Any) -> Iterator[Sandbox]:
    """Boot a sandbox for the duration of the block (arguments as for :meth:`Sandbox.boot`)."""
    sb = Sandbox.boot(name, **kwargs)
    try:
        yield sb
    finally:
        sb.stop()
