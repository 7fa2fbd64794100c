"""Memory pressure: PSI parsing, file selection, triggers on the real kernel, hysteresis."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.core.pressure import Hysteresis, stall_percent
from modeld.system.pressure import (
    PressureReading,
    PressureTrigger,
    PriReader,
    pressure_file,
    read_pressure,
)

PROC_MEMORY = Path("/proc/pressure/memory")
LOAD_HELPER = Path(__file__).resolve().parent.parent / "pressure_load.py"
needs_psi = pytest.mark.skipif(not PROC_MEMORY.exists(), reason="kernel without PSI")


# read_pressure


def test_read_pressure_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "memory.pressure"
    path.write_text(
        "some avg10=12.50 avg60=3.10 avg300=0.75 total=123456\n"
        "full avg10=7.25 avg60=1.00 avg300=0.10 total=65432\n"
    )
    assert read_pressure(path) == PressureReading(
        some_avg10=12.5, full_avg10=7.25, some_total_us=123456, full_total_us=65432
    )


def test_read_pressure_only_some(tmp_path: Path) -> None:
    path = tmp_path / "cpu.pressure"
    path.write_text("some avg10=0.40 avg60=0.20 avg300=0.00 total=99\n")
    assert read_pressure(path) == PressureReading(0.4, 0.0, 99)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage\n",
        "full avg10=1.00 avg60=0.00 avg300=0.00 total=5\n",
        "some avg10=x avg60=0.00 avg300=0.00 total=5\n",
        "some avg10=1.00 avg60=0.00 avg300=0.00\n",
    ],
)
def test_read_pressure_malformed_is_none(tmp_path: Path, text: str) -> None:
    path = tmp_path / "memory.pressure"
    path.write_text(text)
    assert read_pressure(path) is None


def test_read_pressure_missing_is_none(tmp_path: Path) -> None:
    assert read_pressure(tmp_path / "absent") is None


@needs_psi
def test_read_pressure_real_proc_file() -> None:
    first = read_pressure(PROC_MEMORY)
    assert first is not None
    assert 0.0 <= first.full_avg10 <= first.some_avg10 <= 100.0
    second = read_pressure(PROC_MEMORY)
    assert second is not None and second.some_total_us >= first.some_total_us


# pressure_file


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    return path


def test_pressure_file_v2_cgroup(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", touch(tmp_path / "proc-memory")
    touch(root / "cgroup.controllers")
    wanted = touch(root / "modeld.slice" / "memory.pressure")
    assert pressure_file("/modeld.slice", cgroup_root=root, proc_file=proc) == wanted


def test_pressure_file_v2_without_cgroup_file_uses_proc(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", touch(tmp_path / "proc-memory")
    touch(root / "cgroup.controllers")
    (root / "modeld.slice").mkdir()
    assert pressure_file("/modeld.slice", cgroup_root=root, proc_file=proc) == proc


def test_pressure_file_hybrid_uses_proc(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", touch(tmp_path / "proc-memory")
    (root / "memory" / "modeld.slice").mkdir(parents=True)
    assert pressure_file("/modeld.slice", cgroup_root=root, proc_file=proc) == proc


def test_pressure_file_hybrid_prefers_the_unified_hierarchy(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", touch(tmp_path / "proc-memory")
    (root / "memory" / "modeld.slice").mkdir(parents=True)
    wanted = touch(root / "unified" / "modeld.slice" / "memory.pressure")
    assert pressure_file("/modeld.slice", cgroup_root=root, proc_file=proc) == wanted


def test_pressure_file_none_without_psi(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "memory").mkdir(parents=True)
    assert pressure_file("/modeld.slice", cgroup_root=root, proc_file=tmp_path / "no") is None
    touch(root / "cgroup.controllers")
    assert pressure_file("/modeld.slice", cgroup_root=root, proc_file=tmp_path / "no") is None


# PriReader (nested epoll mechanics, with an eventfd)


def test_pri_reader_calls_back_once_per_event_without_spinning() -> None:
    async def scenario() -> list[int]:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        seen: list[int] = []

        def on_event(events: int) -> None:
            seen.append(events)
            os.eventfd_read(efd)

        reader = PriReader(efd, on_event, mask=select.EPOLLIN)
        try:
            await asyncio.sleep(0.05)
            assert seen == []
            os.eventfd_write(efd, 1)
            await asyncio.sleep(0.05)
            os.eventfd_write(efd, 1)
            await asyncio.sleep(0.05)
            reader.close()
            reader.close()
            assert reader.closed
            os.eventfd_write(efd, 1)
            await asyncio.sleep(0.05)
        finally:
            reader.close()
            os.close(efd)
        return seen

    assert asyncio.run(scenario()) == [select.EPOLLIN, select.EPOLLIN]


# PressureTrigger on the real kernel


def has_cap_sys_resource() -> bool:
    status = Path("/proc/self/status").read_text()
    return bool(int(status.split("CapEff:")[1].split()[0], 16) & (1 << 24))


@needs_psi
def test_trigger_falls_back_to_a_2s_window_and_closes() -> None:
    async def scenario() -> PressureTrigger:
        trigger = PressureTrigger(
            PROC_MEMORY, stall_us=150_000, window_us=1_000_000, on_pressure=lambda: None
        )
        try:
            assert not trigger.closed
        finally:
            trigger.close()
        assert trigger.closed
        trigger.close()
        return trigger

    trigger = asyncio.run(scenario())
    if has_cap_sys_resource():  # privileged: 1 s windows are allowed
        assert (trigger.stall_us, trigger.window_us) == (150_000, 1_000_000)
    else:  # kernel >= 6.5 refuses them: rounded up, stall scaled
        assert (trigger.stall_us, trigger.window_us) == (300_000, 2_000_000)


@needs_psi
def test_trigger_rejects_an_invalid_window() -> None:
    async def scenario() -> None:
        with pytest.raises(OSError):
            PressureTrigger(PROC_MEMORY, stall_us=1, window_us=60_000_000, on_pressure=lambda: None)

    asyncio.run(scenario())


@needs_psi
def test_trigger_does_not_spin_the_loop() -> None:
    calls: list[None] = []

    async def scenario() -> float:
        # A stall of the whole window: no other activity on the machine fires it in 0.5 s.
        trigger = PressureTrigger(
            PROC_MEMORY,
            stall_us=2_000_000,
            window_us=2_000_000,
            on_pressure=lambda: calls.append(None),
        )
        try:
            cpu = time.process_time()
            await asyncio.sleep(0.5)
            return time.process_time() - cpu
        finally:
            trigger.close()

    assert asyncio.run(scenario()) < 0.1
    assert calls == []


# Real memory pressure, produced by tests/pressure_load.py in a 64 MiB memory cgroup


@contextlib.contextmanager
def pressure_load(
    tmp_path: Path, seconds: float
) -> Iterator[tuple[subprocess.Popen[str], dict[str, str | None]]]:
    """Run tests/pressure_load.py; yields it (waiting for "go" on stdin) and its JSON line."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a memory cgroup")
    child = subprocess.Popen(
        [sys.executable, str(LOAD_HELPER), "--seconds", str(seconds), "--dir", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    info: dict[str, str | None] = {}
    try:
        line = child.stdout.readline()
        if not line.startswith("{"):
            child.wait(10)
            assert child.stderr is not None
            reason = child.stderr.read().strip()
            if child.returncode == 77:
                pytest.skip(f"cannot produce memory pressure here: {reason}")
            pytest.fail(f"pressure_load failed ({child.returncode}): {reason}")
        info = json.loads(line)
        yield child, info
    finally:
        if child.poll() is None:
            child.terminate()
        child.wait(15)
        for pipe in (child.stdin, child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()
        # The helper removes its cgroups itself; this only matters if it was killed.
        memory_cgroup, psi_file = info.get("memory_cgroup"), info.get("psi_file")
        for leftover in (memory_cgroup, psi_file and str(Path(psi_file).parent)):
            if leftover:
                with contextlib.suppress(OSError):
                    Path(leftover).rmdir()


@needs_psi
def test_real_memory_pressure_fires_the_triggers(tmp_path: Path) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        system_fired = loop.create_future()
        cgroup_fired = loop.create_future()
        cgroup_gone = loop.create_future()

        cgroup_events: list[float] = []
        impossible_events: list[float] = []

        def fire(future: asyncio.Future[float]) -> None:
            if future is cgroup_fired:
                cgroup_events.append(loop.time())
            if not future.done():
                future.set_result(loop.time())

        with pressure_load(tmp_path, seconds=12.0) as (child, info):
            system = PressureTrigger(
                PROC_MEMORY,
                stall_us=10_000,
                window_us=2_000_000,
                on_pressure=lambda: fire(system_fired),
            )
            # Stalling for the whole window is out of reach for the load: this one must stay
            # silent, though the kernel fires it spuriously after creation (stale baseline).
            impossible = PressureTrigger(
                PROC_MEMORY,
                stall_us=2_000_000,
                window_us=2_000_000,
                on_pressure=lambda: impossible_events.append(loop.time()),
            )
            cgroup = None
            psi_file = info["psi_file"]
            if psi_file is not None:  # per-cgroup PSI (v2, or the v2 tree of a hybrid host)
                cgroup = PressureTrigger(
                    Path(psi_file),
                    stall_us=10_000,
                    window_us=2_000_000,
                    on_pressure=lambda: fire(cgroup_fired),
                    on_gone=lambda: fire(cgroup_gone),
                )
            try:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.close()
                started = loop.time()
                await asyncio.wait_for(asyncio.shield(system_fired), 15)
                if cgroup is not None:
                    await asyncio.wait_for(asyncio.shield(cgroup_fired), 15)
                    cgroup_latency = cgroup_fired.result() - started
                    print(f"cgroup trigger after {cgroup_latency:.2f}s")
                    stalled = read_pressure(cgroup.path)
                    assert stalled is not None and stalled.some_total_us >= 10_000
                    # Under sustained pressure: about one event per 2 s window, loop idle.
                    cpu = time.process_time()
                    await asyncio.sleep(5.0)
                    assert time.process_time() - cpu < 0.3
                    gaps = [round(b - a, 2) for a, b in itertools.pairwise(cgroup_events)]
                    print(f"cgroup events {len(cgroup_events)}, gaps {gaps}")
                    assert cgroup.ignored_events == 0
                    assert 2 <= len(cgroup_events) <= 4
                    assert all(gap > 1.5 for gap in gaps)
                print(f"system trigger after {system_fired.result() - started:.2f}s")
                print(f"spurious kernel events dropped: {impossible.ignored_events}")
                assert impossible_events == []
                child.terminate()
                if cgroup is not None:
                    # The helper removes its cgroup on exit: the trigger reports EPOLLERR.
                    await asyncio.wait_for(asyncio.shield(cgroup_gone), 10)
                    assert cgroup.closed
            finally:
                system.close()
                impossible.close()
                if cgroup is not None:
                    cgroup.close()

    asyncio.run(scenario())


# Hysteresis


def test_hysteresis_starts_continues_and_stops() -> None:
    h = Hysteresis(high=10.0, low=5.0)
    assert not h.relieving
    assert not h.should_continue(50.0)  # no trigger yet
    h.start()
    assert h.relieving
    assert h.should_continue(12.0)
    assert h.should_continue(7.0)  # between low and high: keep going
    assert h.should_continue(5.0)  # at low: keep going
    assert not h.should_continue(4.99)
    assert not h.relieving
    assert not h.should_continue(30.0)  # needs a new start()
    h.start()
    assert h.should_continue(30.0)


def test_hysteresis_trigger_threshold_matches_high() -> None:
    assert Hysteresis(high=10.0, low=5.0).stall_us(2_000_000) == 200_000


def test_hysteresis_rejects_inverted_levels() -> None:
    with pytest.raises(ValueError):
        Hysteresis(high=5.0, low=10.0)


def test_stall_percent_is_the_share_of_the_window_spent_stalled() -> None:
    assert stall_percent(1_000, 201_000, 2_000_000) == 10.0
    assert stall_percent(5_000, 5_000, 2_000_000) == 0.0
    assert stall_percent(9_000, 1_000, 2_000_000) == 0.0  # a counter reset is no stall
    assert stall_percent(0, 100, 0) == 0.0
