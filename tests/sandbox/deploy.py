"""Run modeld inside a sandbox as a real unit built from the repository's systemd/ files.

Only what differs between a packaged install and a checkout is changed, in a drop-in:
ExecStart points at this checkout's interpreter and a configuration in a test directory
(under /tmp, which the sandbox shares with the host), and PrivateTmp is off so modeld
sees that directory.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fixture import Sandbox

REPO = Path(__file__).resolve().parents[2]
UNITS = ("modeld.slice", "modeld.socket", "modeld.service")
DEMO_TEXT = REPO / "service" / "modeld" / "data" / "demo.txt"


BACKEND_MODULES = ("modeld.reference_backend", "modeld.llama_backend")
UNIT_PREFIX = "modeld-backend-"


def reference_model(
    *, memory_max: str = "256M", options: tuple[str, ...] = (), extra: str = ""
) -> str:
    """The TOML of a model served by the reference backend on the shipped demo text."""
    text = f'backend = "reference"\nmodel = "{DEMO_TEXT}"\nmemory_max = "{memory_max}"\n'
    text += extra
    if options:
        text += "[options]\nOptions = [" + ", ".join(json.dumps(o) for o in options) + "]\n"
    return text


def llama_model(path: Path, *, memory_max: str = "512M", **options: object) -> str:
    """The TOML of a model served by the llama-cpp backend on the GGUF file ``path``."""
    text = f'backend = "llama-cpp"\nmodel = "{path}"\nmemory_max = "{memory_max}"\n'
    if options:
        text += "[options]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    return text


@dataclass
class Modeld:
    """A modeld deployment in one sandbox, configured from ``config_dir``."""

    sandbox: Sandbox
    config_dir: Path
    daemon: str = ""
    dropin: str = ""
    models: dict[str, str] = field(default_factory=dict)
    python: str = sys.executable
    """The interpreter modeld runs on (and so its backends: MODELD_PYTHON)."""

    @property
    def api_socket(self) -> Path:
        return self.sandbox.run_dir / "modeld" / "api.sock"

    @property
    def models_dir(self) -> Path:
        return self.config_dir / "models.d"

    def write_config(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        for old in self.models_dir.glob("*.toml"):
            old.unlink()
        (self.config_dir / "modeld.toml").write_text(
            f'[daemon]\nmodels_dir = "{self.models_dir}"\n{self.daemon}'
        )
        for name, text in self.models.items():
            (self.models_dir / f"{name}.toml").write_text(text)

    def install(self) -> None:
        """Install the units (repo files + the test drop-in); does not start anything."""
        sb = self.sandbox
        for unit in UNITS:
            sb.install_unit(unit, (REPO / "systemd" / unit).read_text(), reload=False)
        sb.install_dropin(
            "modeld.service",
            "50-checkout",
            "[Service]\nExecStart=\n"
            f"ExecStart={self.python} -m modeld --config {self.config_dir}/modeld.toml\n"
            f"Environment=PYTHONPATH={REPO / 'service'}\n"
            "PrivateTmp=no\nReadWritePaths=/tmp\n" + self.dropin,
            reload=False,
        )
        self.write_config()
        sb.exec("rm", "-f", "/var/lib/modeld/footprints.json")  # no peaks learned elsewhere
        sb.daemon_reload()

    def start(self) -> None:
        """Start the socket and activate modeld through it (a GET /healthz)."""
        self.sandbox.systemctl("start", "modeld.socket")
        self.http_get("/healthz")

    @contextlib.contextmanager
    def deployed(self) -> Iterator[Modeld]:
        """Installed and started for the ``with`` block; stopped and its units removed after."""
        self.stop()
        self.install()
        self.start()
        try:
            yield self
        finally:
            self.stop()
            self.sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])

    def stop(self) -> None:
        self.sandbox.systemctl("stop", "modeld.service", "modeld.socket", check=False)
        self.sandbox.systemctl("reset-failed", "modeld.service", "modeld.socket", check=False)

    def restart(self) -> None:
        self.stop()
        self.write_config()
        self.start()

    def http_get(self, path: str, timeout: float = 20.0) -> tuple[int, Any]:
        """GET over the unix socket; returns (status, decoded JSON body)."""
        return self.http("GET", path, timeout=timeout)

    def http_post(self, path: str, body: Any, timeout: float = 60.0) -> tuple[int, Any]:
        """POST JSON over the unix socket; returns (status, decoded JSON body)."""
        return self.http("POST", path, json.dumps(body).encode(), timeout=timeout)

    def http(
        self, method: str, path: str, payload: bytes = b"", timeout: float = 20.0
    ) -> tuple[int, Any]:
        request = (
            f"{method} {path} HTTP/1.0\r\nHost: modeld\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.api_socket))
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        return status, json.loads(body) if body else None

    def http_text(self, path: str, timeout: float = 20.0) -> tuple[int, str, str]:
        """GET over the unix socket; returns (status, Content-Type, body text): for
        ``/metrics``, which is not JSON."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.api_socket))
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: modeld\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        return int(status_line.split()[1]), content_type.strip(), body.decode()

    # ----------------------------------------------------------------- busctl

    def call(
        self,
        method: str,
        signature: str = "",
        *args: str,
        check: bool = True,
        path: str = "/org/modeld1",
        interface: str = "org.modeld1.Manager",
        timeout: float = 60.0,
    ) -> Any:
        """busctl call on modeld; returns the JSON-decoded reply data (or the process)."""
        proc = self.sandbox.busctl(
            "--json=short",
            f"--timeout={timeout:g}",
            "call",
            "org.modeld1",
            path,
            interface,
            method,
            *((signature, *args) if signature else ()),
            check=check,
            timeout=timeout + 5,
        )
        if proc.returncode != 0:
            return proc
        return json.loads(proc.stdout)["data"] if proc.stdout.strip() else None

    def load(self, name: str, *, wait: bool = True, check: bool = True) -> Any:
        if wait:
            return self.call("Load", "sa{sv}", name, "1", "wait", "b", "true", check=check)
        return self.call("Load", "sa{sv}", name, "0", check=check)

    def unload(self, name: str, *, force: bool = False, check: bool = True) -> Any:
        if force:
            return self.call("Unload", "sa{sv}", name, "1", "force", "b", "true", check=check)
        return self.call("Unload", "sa{sv}", name, "0", check=check)

    def model_path(self, name: str) -> str:
        return str(self.call("GetModel", "s", name)[0])

    def prop(self, name: str, prop: str) -> Any:
        proc = self.sandbox.busctl(
            "--json=short",
            "get-property",
            "org.modeld1",
            self.model_path(name),
            "org.modeld1.Model",
            prop,
        )
        return json.loads(proc.stdout)["data"]

    def manager_prop(self, prop: str) -> Any:
        proc = self.sandbox.busctl(
            "--json=short",
            "get-property",
            "org.modeld1",
            "/org/modeld1",
            "org.modeld1.Manager",
            prop,
        )
        return json.loads(proc.stdout)["data"]

    def wait_state(self, name: str, states: set[str], timeout: float = 30.0) -> str:
        """Test helper: wait until the model's State is one of ``states``."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.prop(name, "State")
            if state in states:
                return str(state)
            time.sleep(0.05)
        raise AssertionError(f"{name} stayed {state!r}, expected one of {sorted(states)}")

    # ------------------------------------------------------------ systemd side

    def scopes(self) -> list[str]:
        """modeld's backend scopes currently loaded in systemd (any state)."""
        out = self.sandbox.systemctl(
            "list-units", "--all", "--plain", "--no-legend", "modeld-backend-*", check=False
        ).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def unit_pids(self, unit: str) -> list[int]:
        """Namespace PIDs of the processes in ``unit`` (systemd's GetUnitProcesses)."""
        proc = self.sandbox.busctl(
            "--json=short",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "GetUnitProcesses",
            "s",
            unit,
        )
        return [int(entry[1]) for entry in json.loads(proc.stdout)["data"][0]]

    def backend_processes(self) -> list[str]:
        """Command lines of modeld's own backends running anywhere in the sandbox."""
        out = self.sandbox.exec("ps", "-eo", "args", check=False).stdout
        return [line for line in out.splitlines() if any(m in line for m in BACKEND_MODULES)]

    def leftovers(self, name: str) -> list[str]:
        """Scopes, backend processes and sockets of ``name`` still there (should be none)."""
        from modeld.naming import socket_stem, unit_escape

        stem = socket_stem(name)
        return [
            *(u for u in self.scopes() if unit_escape(name) in u),
            *(p for p in self.backend_processes() if f"/backends/{stem}/" in p),
            *(s for s in self.backend_sockets() if s == stem),
        ]

    def main_pid(self) -> int:
        """modeld's MainPID as systemd has it (0: not running)."""
        out = self.sandbox.systemctl("show", "-P", "MainPID", "modeld.service").stdout
        return int(out.strip() or 0)

    def assert_serves(self, model: str) -> None:
        """``model`` answers a completion through the front door."""
        status, body = self.http_post(
            "/v1/completions", {"model": model, "prompt": "The sea", "max_tokens": 3}
        )
        assert status == 200, body
        assert body["choices"][0]["text"]

    def assert_consistent(self) -> None:
        """modeld's view equals systemd's: exactly one scope per model with a backend (the
        one its Unit names, once loaded), no scope, process or socket of any other."""
        from modeld.naming import unit_escape

        states = {name: state for name, state, _backend, _path in self.call("ListModels")[0]}
        scopes = self.scopes()
        for name, state in states.items():
            mine = [s for s in scopes if s.startswith(f"{UNIT_PREFIX}{unit_escape(name)}-")]
            if state in ("ready", "busy"):
                assert mine == [self.prop(name, "Unit")], (name, state, scopes)
            elif state in ("unloaded", "failed"):
                left = self.leftovers(name)
                assert left == [], (name, state, left)
        live = {"ready", "busy", "loading", "unloading"}
        assert len(scopes) == sum(state in live for state in states.values()), (states, scopes)

    def backend_sockets(self) -> list[str]:
        """The models (socket stems) whose backend socket exists."""
        directory = self.sandbox.run_dir / "modeld" / "backends"
        return (
            sorted(p.parent.name for p in directory.glob("*/*.sock")) if directory.exists() else []
        )


def deploy(
    sandbox: Sandbox,
    config_dir: Path,
    models: Mapping[str, str],
    *,
    daemon: str = "",
    dropin: str = "",
) -> Modeld:
    """Install modeld in ``sandbox`` with ``models`` and start it through its socket."""
    modeld = Modeld(sandbox, config_dir, daemon=daemon, dropin=dropin, models=dict(models))
    modeld.stop()
    modeld.install()
    modeld.start()
    return modeld
