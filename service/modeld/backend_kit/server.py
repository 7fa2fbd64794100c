"""Process entry point of a backend: arguments, signals, the gRPC server.

``serve(argv, name=..., description=..., make_servicer=...)`` serves until SIGTERM or
SIGINT, then exits 0 (SIGTERM is only logged while ``ProcessControl.ignore_sigterm`` is
on, a test knob of the reference backend). Exit status 2 means the arguments or the
address were unusable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable

from modeld.backend_kit.log import log, set_name

DEFAULT_WORKERS = 32
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest request accepted (gRPC's default, 4 MiB, is below modeld's HTTP body limit)."""
STOP_GRACE_SECONDS = 0.5


class ProcessControl:
    """Process-wide switches that outlive one RPC (set by LoadModel, read at SIGTERM), and
    the fds the process was started with (before gRPC or anything else opened one)."""

    def __init__(self, inherited_fds: dict[int, str] | None = None) -> None:
        self.ignore_sigterm = False
        self.inherited_fds = inherited_fds or {}


def open_fds() -> dict[int, str]:
    """The file descriptors open in this process now, with what each refers to."""
    found = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            found[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except FileNotFoundError:
            continue  # the descriptor listdir itself used, closed by now
    return dict(sorted(found.items()))


def identity(inherited_fds: dict[int, str]) -> dict[str, object]:
    """Who this process runs as and what it was given (for tests of modeld's leash)."""
    with open("/proc/self/status", encoding="ascii") as status:
        umask = next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "umask": umask,
        "cwd": os.getcwd(),
        "environ": dict(os.environ),
        "inherited_fds": {str(fd): target for fd, target in inherited_fds.items()},
    }


def parse_args(argv: list[str] | None, prog: str, description: str) -> argparse.Namespace:
    """Parse the command line (``--addr`` as LocalAI passes it to backends)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
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


def serve(
    argv: list[str] | None,
    *,
    name: str,
    prog: str,
    description: str,
    make_servicer: Callable[[ProcessControl], object],
) -> int:
    """Run a backend; returns the exit status (SIGTERM/SIGINT exit via ``os._exit(0)``).

    ``name`` prefixes log lines; ``make_servicer`` builds the ``backend.Backend``
    servicer (it is called after the arguments are parsed, so ``--help`` stays fast).
    SIGTERM and SIGINT are blocked in every thread and taken synchronously by the main
    thread with sigwait: a Python signal handler would only run once the main thread
    wakes up, and a signal delivered to one of gRPC's threads does not wake it.
    """
    set_name(name)
    inherited_fds = open_fds()
    signals = {signal.SIGTERM, signal.SIGINT}
    for sig in signals:  # an inherited SIG_IGN would make sigwait miss them
        signal.signal(sig, signal.SIG_DFL)
    # Before any thread exists, so that every thread inherits the mask.
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    args = parse_args(argv, prog, description)

    from concurrent.futures import ThreadPoolExecutor

    import grpc

    from modeld.rpc import backend_pb2_grpc

    control = ProcessControl(inherited_fds)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="rpc"),
        # Fail on a TCP port that is already taken instead of sharing it.
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    backend_pb2_grpc.add_BackendServicer_to_server(make_servicer(control), server)
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

    while True:
        signum = signal.sigwait(signals)
        if signum == signal.SIGTERM and control.ignore_sigterm:
            log("ignoring SIGTERM as asked (ignore_sigterm)")
            continue
        log(f"{signal.Signals(signum).name} received, exiting")
        break
    server.stop(STOP_GRACE_SECONDS).wait(STOP_GRACE_SECONDS + 1)
    path = _unix_path(args.addr)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)
    log("stopped")
    sys.stderr.flush()
    # Exit without joining worker threads: an RPC hung on purpose must not keep us alive.
    os._exit(0)
