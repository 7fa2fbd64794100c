"""modeld end to end, in a throwaway systemd: activation, Load, a request, Unload.

Boots the project's sandbox (a real systemd + D-Bus in namespaces), installs modeld from
the repository's unit files, loads the shipped ``demo`` model over D-Bus with busctl, asks
it for text through ``POST /v1/completions`` and over gRPC, and unloads it again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "service"))

from sandbox import booted_sandbox  # noqa: E402
from sandbox.deploy import Modeld  # noqa: E402

DEMO_CONFIG = REPO / "service" / "modeld" / "data" / "models.d" / "demo.toml"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(argv: list[str], env: dict[str, str] | None = None) -> str:
    print("$ " + " ".join(argv), flush=True)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    print(out.rstrip(), flush=True)
    return out


def ask_backend(endpoint_on_host: Path, prompt: str) -> str:
    import grpc

    from modeld.rpc import backend_pb2, backend_pb2_grpc

    with grpc.insecure_channel(f"unix:{endpoint_on_host}") as channel:
        stub = backend_pb2_grpc.BackendStub(channel)
        reply = stub.Predict(
            backend_pb2.PredictOptions(Prompt=prompt, Tokens=24, Temperature=0), timeout=30
        )
    return str(reply.message.decode())


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="modeld-demo-") as tmp:
        config = Path(tmp)
        models = config / "models.d"
        models.mkdir()
        demo_toml = DEMO_CONFIG.read_text().replace(
            '"../demo.txt"', f'"{REPO / "service" / "modeld" / "data" / "demo.txt"}"'
        )
        step("booting a throwaway systemd with its own D-Bus system bus")
        with booted_sandbox(dbus_policy_files=[REPO / "systemd" / "org.modeld1.conf"]) as sb:
            print(f"sandbox {sb.name} up in {sb.boot_ms} ms; bus {sb.bus_address}")
            env = sb.env()
            modeld = Modeld(sb, config, models={"demo": demo_toml})
            modeld.install()
            step("modeld.socket is listening; the first connection starts modeld.service")
            sb.systemctl("start", "modeld.socket")
            print("modeld.service:", sb.show("modeld.service", "ActiveState"))
            start = time.monotonic()
            status, body = modeld.http_get("/healthz")
            print(
                f"GET /healthz -> {status} {body} ({(time.monotonic() - start) * 1000:.0f} ms,"
                " including modeld's start)"
            )
            print(
                "modeld.service:",
                sb.show("modeld.service", "ActiveState"),
                "| status:",
                sb.show("modeld.service", "StatusText"),
            )

            step("load the demo model over D-Bus with plain busctl")
            show(
                [
                    "busctl",
                    "--system",
                    "call",
                    "org.modeld1",
                    "/org/modeld1",
                    "org.modeld1.Manager",
                    "Load",
                    "sa{sv}",
                    "demo",
                    "1",
                    "wait",
                    "b",
                    "true",
                ],
                env,
            )
            unit = modeld.prop("demo", "Unit")
            print(sb.systemctl("status", unit, "--no-pager", "--lines=0", check=False).stdout)

            step("a request through modeld's front door: POST /v1/completions")
            request = {
                "model": "demo",
                "prompt": "The lighthouse keeper",
                "max_tokens": 24,
                "temperature": 0,
            }
            status, body = modeld.http_post("/v1/completions", request)
            print(f"POST /v1/completions {request} -> {status}")
            print(f"text:  {body['choices'][0]['text']!r}\nusage: {body['usage']}")

            step("or straight to the backend over gRPC (endpoint from its D-Bus properties)")
            endpoint = modeld.prop("demo", "Endpoint").removeprefix("unix:")
            on_host = sb.run_dir / Path(endpoint).relative_to("/run")
            print(f"Predict -> {ask_backend(on_host, 'The sea')!r}")

            step("modeldctl")
            ctl = [sys.executable, "-m", "modeld.cli.main"]
            env["PYTHONPATH"] = str(REPO / "service")
            show([*ctl, "status"], env)

            step("unload: the scope and the backend are gone")
            show([*ctl, "unload", "demo"], env)
            print("scopes left:", modeld.scopes() or "none")
            print("backend processes left:", modeld.backend_processes() or "none")
            modeld.stop()
        shutil.rmtree(config, ignore_errors=True)
    step("done: the sandbox is stopped and nothing is left on this machine")
    return 0


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("the demo boots a systemd in namespaces: run it as root")
    raise SystemExit(main())
