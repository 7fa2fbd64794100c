"""Learned footprints: the admission rule (pure, under hypothesis), its use by the eviction
decision, the configuration key and the store that keeps footprints across restarts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeld.config import ModelConfig, default_daemon_config, load_model_config
from modeld.core.eviction import UNLIMITED, Limits, ModelView, decide_load
from modeld.core.footprint import PEAK_SLACK, admission_need
from modeld.core.states import ModelState
from modeld.supervisor.footprints import (
    FILE_NAME,
    Footprint,
    FootprintStore,
    footprint_key,
    state_directory,
)

M = 1024**2
G = 1024**3
sizes = st.integers(0, 2**64 - 1)
limits = st.one_of(st.just(UNLIMITED), st.integers(1, 2**64 - 2))


@given(limits)
def test_without_a_learned_peak_a_model_needs_its_limit(memory_max: int) -> None:
    assert admission_need(memory_max, 0) == memory_max


@given(limits, st.integers(1, 2**64 - 1))
def test_a_learned_peak_gives_the_peak_plus_margin_capped_at_the_limit(
    memory_max: int, peak: int
) -> None:
    need = admission_need(memory_max, peak)
    assert need <= memory_max, "more than MemoryMax lets the backend use"
    assert need == memory_max or need > peak, "no margin over the peak"
    assert need == min(memory_max, peak + peak // 10 + PEAK_SLACK)


@given(limits, sizes, sizes)
def test_the_need_grows_with_the_peak(memory_max: int, low: int, high: int) -> None:
    low, high = sorted((low, high))
    if low > 0:
        assert admission_need(memory_max, low) <= admission_need(memory_max, high)


def test_examples() -> None:
    assert admission_need(4 * G, 100 * M) == 110 * M + PEAK_SLACK
    assert admission_need(100 * M, 100 * M) == 100 * M  # capped by the limit
    assert admission_need(UNLIMITED, 100 * M) == 110 * M + PEAK_SLACK


def view(name: str, state: ModelState, **kw: object) -> ModelView:
    return ModelView(name=name, state=state, **kw)  # type: ignore[arg-type]


def test_a_model_refused_by_its_memory_max_is_admitted_by_its_learned_peak() -> None:
    budget = Limits(memory_budget=1 * G)
    unknown = [view("t", ModelState.UNLOADED, memory_max=2 * G)]
    refusal = decide_load("t", unknown, [], budget).refusal
    assert (
        refusal
        == "t needs 2.0 GiB of memory (memory_max) but the budget for all backends is 1.0 GiB"
    )
    learned = [view("t", ModelState.UNLOADED, memory_max=2 * G, memory_peak=200 * M)]
    assert decide_load("t", learned, [], budget).admitted
    grown = [view("t", ModelState.UNLOADED, memory_max=2 * G, memory_peak=1 * G)]
    refusal = decide_load("t", grown, [], budget).refusal
    assert refusal is not None and "(its learned peak + margin)" in refusal


def test_a_small_learned_peak_no_longer_evicts_others() -> None:
    others = [view("a", ModelState.READY, memory_current=600 * M, last_used_us=1)]
    limits = Limits(memory_budget=1 * G)
    by_limit = decide_load(
        "t", [*others, view("t", ModelState.UNLOADED, memory_max=800 * M)], [], limits
    )
    assert [(e.name, e.reason) for e in by_limit.evict] == [("a", "memory")]
    target = view("t", ModelState.UNLOADED, memory_max=800 * M, memory_peak=100 * M)
    assert decide_load("t", [*others, target], [], limits).evict == ()


def test_a_loading_model_counts_with_its_learned_need() -> None:
    loading = view("l", ModelState.LOADING, memory_max=4 * G, memory_peak=100 * M)
    assert loading.memory_charge == 110 * M + PEAK_SLACK
    unlimited = view("u", ModelState.LOADING, memory_peak=100 * M, memory_current=300 * M)
    assert unlimited.memory_charge == 300 * M


# -- the configuration key ------------------------------------------------------------------


def config(tmp: Path, text: str = "") -> ModelConfig:
    daemon = default_daemon_config(host_memory=16 * G)
    path = tmp / "m.toml"
    path.write_text('backend = "reference"\nmodel = "/srv/demo.txt"\nmemory_max = "1G"\n' + text)
    return load_model_config(path, daemon, host_memory=16 * G)


@pytest.mark.parametrize(
    "change",
    [
        {"backend": "llama-cpp"},
        {"model": "/srv/other.txt"},
        {"options": {"ContextSize": 4096}},
        {"parallel": 4},
        {"memory_max": 2 * G},
        {"memory_high": 500 * M},
        {"gpu_memory": G},
    ],
)
def test_settings_that_shape_memory_change_the_key(
    tmp_path: Path, change: dict[str, object]
) -> None:
    base = config(tmp_path)
    assert footprint_key(dataclasses.replace(base, **change)) != footprint_key(base)  # type: ignore[arg-type]


def test_scheduling_settings_keep_the_key(tmp_path: Path) -> None:
    base = config(tmp_path)
    changed = config(
        tmp_path,
        'pinned = true\nidle_timeout = "5m"\nconcurrency_groups = ["x"]\nrestart = "on-failure"\n'
        "max_queue = 3\ncpu_weight = 50\n",
    )
    assert footprint_key(changed) == footprint_key(base)


# -- the store --------------------------------------------------------------------------------


def test_footprints_persist_and_keep_the_highest_peak_per_configuration(tmp_path: Path) -> None:
    store = FootprintStore(tmp_path)
    assert store.memory_peak("a", "k1") == 0
    assert store.learn("a", Footprint("k1", 100 * M)) == Footprint("k1", 100 * M)
    assert store.learn("a", Footprint("k1", 80 * M, gpu_memory=G)) == Footprint("k1", 100 * M, G)
    assert store.learn("b", Footprint("k9", 5 * M)).memory_peak == 5 * M
    again = FootprintStore(tmp_path)
    assert again.get("a", "k1") == Footprint("k1", 100 * M, G)
    assert again.memory_peak("a", "k2") == 0, "a peak of another configuration was used"
    assert again.learn("a", Footprint("k2", 30 * M)) == Footprint("k2", 30 * M)  # replaced
    assert FootprintStore(tmp_path).get("a", "k1") is None
    data = json.loads((tmp_path / FILE_NAME).read_text())
    assert data["a"] == {"key": "k2", "memory_peak": 30 * M, "gpu_memory": 0}
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unreadable_file_starts_empty_and_an_unwritable_one_keeps_peaks_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / FILE_NAME).write_text("{not json")
    store = FootprintStore(tmp_path)
    assert store.memory_peak("a", "k") == 0
    assert "ignoring unreadable footprints" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("")
    memory_only = FootprintStore(blocked / "sub")  # its parent is a file: cannot be created
    memory_only.learn("a", Footprint("k", M))
    memory_only.learn("a", Footprint("k", 2 * M))
    assert memory_only.memory_peak("a", "k") == 2 * M
    assert caplog.text.count("cannot save learned footprints") == 1


def test_the_state_directory_is_systemds_or_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/modeld:/var/lib/other")
    assert state_directory() == Path("/var/lib/modeld")
    monkeypatch.setenv("STATE_DIRECTORY", "/home/u/.local/state/modeld")
    assert state_directory() == Path("/home/u/.local/state/modeld")
    monkeypatch.delenv("STATE_DIRECTORY")
    assert state_directory() == Path("/var/lib/modeld")
