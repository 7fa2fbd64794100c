"""A fake ``libnvidia-ml.so.1`` for GPU tests on machines without a GPU.

``build_fake_nvml()`` compiles ``fakenvml.c`` with the system C compiler; unmodified pynvml loads
the result through ``LD_LIBRARY_PATH=<dir>`` (set when the process starts) or an earlier
``ctypes.CDLL(<path>)``. The library reads the GPU state from the file named by
``$FAKE_NVML_STATE`` (see ``STATE_ENV``) and re-reads it when the file changes, so tests can
change the GPUs under a running process with ``write_state()``. The file format is described at
the top of ``fakenvml.c``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "LIBRARY_NAME",
    "SOURCE",
    "STATE_ENV",
    "FakeFailure",
    "FakeGpu",
    "FakeProcess",
    "build_fake_nvml",
    "fake_nvml_env",
    "write_state",
]

SOURCE = Path(__file__).with_name("fakenvml.c")
LIBRARY_NAME = "libnvidia-ml.so.1"
STATE_ENV = "FAKE_NVML_STATE"
GiB = 1 << 30

# NVML return codes the tests inject (nvml.h).
NOT_SUPPORTED = 3
DRIVER_NOT_LOADED = 9
GPU_IS_LOST = 15


@dataclass(frozen=True, slots=True)
class FakeGpu:
    """One ``gpu`` line. Memory in bytes; ``other`` is allocated memory no listed process owns."""

    uuid: str
    name: str = "Fake GPU"
    total: int = 16 * GiB
    reserved: int = 0
    other: int = 0
    util: int = 0
    memutil: int = 0


@dataclass(frozen=True, slots=True)
class FakeProcess:
    """One ``proc`` line. ``gpu``: position in the ``gpus`` list, or a uuid; ``used=None``
    reports NVML_VALUE_NOT_AVAILABLE."""

    gpu: int | str
    pid: int
    used: int | None
    kind: Literal["compute", "graphics"] = "compute"


@dataclass(frozen=True, slots=True)
class FakeFailure:
    """One ``fail`` line: calls to the C function ``fn`` (and its ``_vN`` variants) on ``gpu``
    (position or uuid; None: any device and calls without one) return NVML error ``code``."""

    fn: str
    code: int
    gpu: int | str | None = None


def build_fake_nvml(dest_dir: Path, *, old_driver: bool = False) -> Path:
    """Compile the fake into ``dest_dir/libnvidia-ml.so.1`` (SONAME libnvidia-ml.so.1).

    ``old_driver`` builds a driver older than R510: no ``nvmlDeviceGetMemoryInfo_v2`` and no
    ``*_v3`` process queries. Raises RuntimeError if no compiler is found or compiling fails.
    """
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) to build the fake libnvidia-ml.so.1")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / LIBRARY_NAME
    partial = dest_dir / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
    command = [
        compiler,
        "-O2",
        "-Wall",
        "-Wextra",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        f"-Wl,-soname,{LIBRARY_NAME}",
        *(["-DFAKE_NO_V3"] if old_driver else []),
        "-o",
        str(partial),
        str(SOURCE),
        "-pthread",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"building the fake NVML failed: {' '.join(command)}\n{result.stderr}")
    os.replace(partial, target)
    return target


def fake_nvml_env(library: Path | None, state: Path | None) -> dict[str, str]:
    """A copy of ``os.environ`` for a child process that loads ``library`` (None: no NVML
    library on the search path) with GPU state from ``state`` (None: driver not loaded)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", STATE_ENV)}
    if library is not None:
        env["LD_LIBRARY_PATH"] = str(library.parent)
    if state is not None:
        env[STATE_ENV] = str(state)
    return env


def write_state(
    path: Path,
    *,
    driver: str = "550.54.15",
    gpus: Iterable[FakeGpu] = (),
    procs: Iterable[FakeProcess] = (),
    fails: Iterable[FakeFailure] = (),
    init_error: int | None = None,
) -> None:
    """Write the fake's state file atomically (temp file + os.replace).

    The new file always differs from the old one in inode and mtime, so a running fake
    re-reads it on its next call.
    """
    lines = [f"driver {_token(driver)}"]
    if init_error is not None:
        lines.append(f"init_error {int(init_error)}")
    for gpu in gpus:
        if any(c in gpu.name for c in "#\n\r"):
            raise ValueError(f"a fake GPU name cannot contain '#' or line breaks: {gpu.name!r}")
        lines.append(
            f"gpu uuid={_token(gpu.uuid)} total={gpu.total} reserved={gpu.reserved}"
            f" other={gpu.other} util={gpu.util} memutil={gpu.memutil} name={gpu.name}"
        )
    for proc in procs:
        used = "na" if proc.used is None else str(proc.used)
        lines.append(
            f"proc gpu={_token(str(proc.gpu))} pid={proc.pid} used={used} kind={proc.kind}"
        )
    for fail in fails:
        gpu_ref = "-1" if fail.gpu is None else _token(str(fail.gpu))
        lines.append(f"fail fn={_token(fail.fn)} gpu={gpu_ref} code={fail.code}")
    text = "\n".join(lines) + "\n"

    try:
        previous_mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        previous_mtime = 0
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        mtime = max(time.time_ns(), previous_mtime + 1_000_000)
        os.utime(temp, ns=(mtime, mtime))
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _token(value: str) -> str:
    if not value or any(c.isspace() or c == "#" for c in value):
        raise ValueError(f"not a single token for the fake NVML state file: {value!r}")
    return value
