"""Process entry point of the reference backend: arguments, signals, the gRPC server.

``main(["--addr", "unix:/run/x.sock"])`` serves until SIGTERM or SIGINT, then exits 0
(SIGTERM is only logged while the ``ignore_sigterm`` knob is on). Exit status 2 means
the arguments or the address were unusable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from types import FrameType

from modeld.reference_backend.log import log

DEFAULT_WORKERS = 32
STOP_GRACE_SECONDS = 0.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (``--addr`` as LocalAI passes it to backends)."""
    parser = argparse.ArgumentParser(
        prog="python -m modeld.reference_backend",
        description="modeld's reference backend: an n-gram model served over gRPC.",
    )
    parser.add_argument(
        "--addr",
        required=True,
        help="where to listen: unix:/absolute/path.sock or HOST:PORT",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"RPCs served at once (default {DEFAULT_WORKERS})",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def _unix_path(addr: str) -> str | None:
    if addr.startswith("unix://"):
        return addr[len("unix://") :]
    if addr.startswith("unix:"):
        return addr[len("unix:") :]
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the backend; returns the exit status (SIGTERM/SIGINT exit via ``os._exit(0)``)."""
    stop = threading.Event()
    # Imported lazily below, so install the handlers first: a SIGTERM during start-up
    # must still end in a clean exit.
    from modeld.reference_backend.knobs import ProcessControl

    control = ProcessControl()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM and control.ignore_sigterm:
            log("ignoring SIGTERM as asked (ignore_sigterm)")
            return
        log(f"{name} received, exiting")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    args = parse_args(argv)

    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from modeld.reference_backend.servicer import ReferenceBackend
    from modeld.rpc import backend_pb2_grpc

    server = grpc.server(
        ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="rpc"),
        # Fail on a TCP port that is already taken instead of sharing it.
        options=[("grpc.so_reuseport", 0)],
    )
    backend_pb2_grpc.add_BackendServicer_to_server(ReferenceBackend(control), server)
    try:
        port = server.add_insecure_port(args.addr)
    except RuntimeError as e:  # newer grpcio raises, older ones return 0
        log(f"cannot listen on {args.addr}: {e}")
        return 2
    if port == 0:
        log(f"cannot listen on {args.addr}")
        return 2
    server.start()
    log(f"listening on {args.addr}")

    while not stop.wait(timeout=3600):
        pass
    server.stop(STOP_GRACE_SECONDS).wait(STOP_GRACE_SECONDS + 1)
    path = _unix_path(args.addr)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)
    log("stopped")
    sys.stderr.flush()
    # Exit without joining worker threads: an RPC hung on purpose must not keep us alive.
    os._exit(0)
