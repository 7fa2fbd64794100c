"""The Prometheus metrics: fed with owner events and request reports, read back through
prometheus_client's own parser, values checked against what happened."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

import modeld
from modeld.core.states import ModelState
from modeld.http.app import build_app
from modeld.metrics import CONTENT_TYPE, UNLOAD_REASONS, Metrics
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.units import UINT64_MAX

Labels = frozenset[tuple[str, str]]


def samples(metrics: Metrics) -> dict[tuple[str, Labels], float]:
    """Every sample of the exposition, by (sample name, labels)."""
    text = metrics.exposition().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def with_model(metrics: Metrics, model: str) -> list[tuple[str, Labels]]:
    return [key for key in samples(metrics) if ("model", model) in key[1]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Model:
    """Publishes status changes the way an owner does (whole snapshots, before and after)."""

    metrics: Metrics
    name: str
    status: ModelStatus = field(default_factory=ModelStatus)

    def set(self, **changes: Any) -> None:
        before, self.status = self.status, replace(self.status, **changes)
        self.metrics.on_status_changed(StatusChange(self.name, before, self.status))

    def go(self, *states: ModelState, **changes: Any) -> None:
        for state in states:
            self.set(state=state, **changes)


def setup(*names: str) -> tuple[Metrics, Clock, dict[str, Model]]:
    clock = Clock()
    metrics = Metrics(clock=clock)
    metrics.sync_models(names)
    return metrics, clock, {name: Model(metrics, name) for name in names}


L, R, B, U, F, X = (
    ModelState.LOADING,
    ModelState.READY,
    ModelState.BUSY,
    ModelState.UNLOADING,
    ModelState.FAILED,
    ModelState.UNLOADED,
)


def test_build_info_every_state_and_zeroed_counters_for_each_configured_model() -> None:
    metrics, _, _ = setup("a", "b")
    assert value(metrics, "modeld_build_info", version=modeld.__version__) == 1
    for state in ModelState:
        expected = 2 if state is ModelState.UNLOADED else 0
        assert value(metrics, "modeld_models", state=str(state)) == expected
    assert value(metrics, "modeld_model_state", model="a", state="unloaded") == 1
    assert value(metrics, "modeld_model_state", model="a", state="ready") == 0
    for result in ("loaded", "failed", "cancelled"):
        assert value(metrics, "modeld_loads_total", model="b", result=result) == 0
    for reason in UNLOAD_REASONS:
        assert value(metrics, "modeld_unloads_total", model="b", reason=reason) == 0
    assert value(metrics, "modeld_load_duration_seconds_count", model="a") == 0


def test_a_load_counts_once_with_its_duration_and_the_state_gauges_follow() -> None:
    metrics, clock, models = setup("a", "b")
    models["a"].go(L)
    assert value(metrics, "modeld_models", state="loading") == 1
    clock.now += 2.5
    models["a"].go(R)
    models["a"].go(B, in_flight=1)
    models["a"].go(R, in_flight=0)
    models["a"].set(last_used_us=5, memory_max=7)  # no state change: nothing counted
    assert value(metrics, "modeld_loads_total", model="a", result="loaded") == 1
    assert value(metrics, "modeld_load_duration_seconds_count", model="a") == 1
    assert value(metrics, "modeld_load_duration_seconds_sum", model="a") == 2.5
    assert value(metrics, "modeld_load_duration_seconds_bucket", model="a", le="2.0") == 0
    assert value(metrics, "modeld_load_duration_seconds_bucket", model="a", le="5.0") == 1
    assert value(metrics, "modeld_models", state="ready") == 1
    assert value(metrics, "modeld_models", state="unloaded") == 1
    assert value(metrics, "modeld_model_state", model="a", state="ready") == 1
    assert value(metrics, "modeld_model_state", model="a", state="unloaded") == 0
    assert value(metrics, "modeld_loads_total", model="b", result="loaded") == 0


def test_failed_and_cancelled_loads_are_counted_apart_and_have_no_duration() -> None:
    metrics, _, models = setup("a")
    models["a"].go(L, F)
    metrics.on_unloaded("a", "failed")
    models["a"].go(X, L, U, X)
    metrics.on_unloaded("a", "requested")
    assert value(metrics, "modeld_loads_total", model="a", result="failed") == 1
    assert value(metrics, "modeld_loads_total", model="a", result="cancelled") == 1
    assert value(metrics, "modeld_loads_total", model="a", result="loaded") == 0
    assert value(metrics, "modeld_load_duration_seconds_count", model="a") == 0
    assert value(metrics, "modeld_unloads_total", model="a", reason="failed") == 1
    assert value(metrics, "modeld_unloads_total", model="a", reason="requested") == 1
    # it never served, so no age at unload was observed
    assert not [k for k in samples(metrics) if k[0].startswith("modeld_model_age_at_unload")]


def test_the_age_at_unload_is_the_time_it_served_by_reason() -> None:
    metrics, clock, models = setup("a")
    models["a"].go(L)
    clock.now += 1
    models["a"].go(R)
    clock.now += 30
    models["a"].go(B)
    clock.now += 30
    models["a"].go(R)
    models["a"].go(U)
    clock.now += 8  # stopping the scope is not serving
    models["a"].go(X)
    metrics.on_unloaded("a", "lru")
    assert value(metrics, "modeld_unloads_total", model="a", reason="lru") == 1
    assert value(metrics, "modeld_model_age_at_unload_seconds_count", model="a", reason="lru") == 1
    assert value(metrics, "modeld_model_age_at_unload_seconds_sum", model="a", reason="lru") == 60
    # a crash while serving: the age runs until it stopped serving
    models["a"].go(L)
    models["a"].go(R)
    clock.now += 5
    models["a"].go(F)
    metrics.on_unloaded("a", "crashed")
    age = value(metrics, "modeld_model_age_at_unload_seconds_sum", model="a", reason="crashed")
    assert age == 5
    assert value(metrics, "modeld_unloads_total", model="a", reason="crashed") == 1


def test_a_readopted_backend_is_not_a_load_but_its_age_counts_from_the_adoption() -> None:
    metrics, clock, models = setup("a")
    models["a"].go(L, main_pid=4242, load_count=3)
    clock.now += 0.01
    models["a"].go(R)
    assert value(metrics, "modeld_loads_total", model="a", result="loaded") == 0
    assert value(metrics, "modeld_load_duration_seconds_count", model="a") == 0
    clock.now += 100
    models["a"].go(U)
    models["a"].go(X, main_pid=0)
    metrics.on_unloaded("a", "idle")
    assert value(metrics, "modeld_model_age_at_unload_seconds_sum", model="a", reason="idle") == 100
    # the next load is a real one again
    models["a"].go(L)
    models["a"].go(R)
    assert value(metrics, "modeld_loads_total", model="a", result="loaded") == 1


def test_requests_by_model_route_and_status_unknown_models_share_one_label() -> None:
    metrics, _, _ = setup("a")
    route = "/v1/completions"
    metrics.request_finished("a", route, 200, 0.3)
    metrics.request_finished("a", route, 200, 0.2)
    metrics.request_finished("a", route, 429, 0.001)
    metrics.first_token("a", route, 0.04)
    metrics.request_finished("no-such-model", route, 404, 0.002)
    metrics.request_finished("", route, 400, 0.001)
    metrics.request_finished("'; DROP", "/v1/embeddings", 404, 0.001)
    assert value(metrics, "modeld_requests_total", model="a", route=route, status="200") == 2
    assert value(metrics, "modeld_requests_total", model="a", route=route, status="429") == 1
    assert value(metrics, "modeld_requests_total", model="", route=route, status="404") == 1
    assert value(metrics, "modeld_requests_total", model="", route=route, status="400") == 1
    models = {dict(k[1]).get("model") for k in samples(metrics) if k[0].startswith("modeld_req")}
    assert models == {"a", ""}
    count = value(metrics, "modeld_request_duration_seconds_count", model="a", route=route)
    assert count == 3
    total = value(metrics, "modeld_request_duration_seconds_sum", model="a", route=route)
    assert total is not None and math.isclose(total, 0.501)
    assert value(metrics, "modeld_time_to_first_token_seconds_count", model="a", route=route) == 1
    le = {"model": "a", "route": route}
    assert value(metrics, "modeld_time_to_first_token_seconds_bucket", **le, le="0.05") == 1
    assert value(metrics, "modeld_time_to_first_token_seconds_bucket", **le, le="0.025") == 0


@dataclass
class FakeQueue:
    waiting: int = 0
    running: int = 0


@dataclass
class FakeOwner:
    name: str
    status: ModelStatus = field(default_factory=ModelStatus)


@dataclass
class FakeSupervisor:
    """The figures a scrape reads (queues, statuses, cgroup memory)."""

    models: dict[str, FakeOwner]
    queues: dict[str, FakeQueue] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    max_loaded: int = 2

    def owners(self) -> Iterable[FakeOwner]:
        return self.models.values()

    def queue_figures(self, name: str) -> tuple[int, int]:
        queue = self.queues.get(name, FakeQueue())
        return queue.waiting, queue.running

    def memory_current(self, name: str) -> int:
        return self.memory.get(name, 0)

    def loaded_count(self) -> int:
        return 0


def test_queue_in_flight_and_memory_are_read_when_scraped() -> None:
    source = FakeSupervisor({"a": FakeOwner("a"), "b": FakeOwner("b")})
    metrics = Metrics(source, memory_budget=8 << 30)
    assert value(metrics, "modeld_requests_waiting", model="a") == 0
    source.queues["a"] = FakeQueue(waiting=3, running=1)
    source.models["a"].status = ModelStatus(in_flight=5, memory_max=256 << 20, gpu_memory=1 << 30)
    source.memory["a"] = 123456
    assert value(metrics, "modeld_requests_waiting", model="a") == 3
    assert value(metrics, "modeld_requests_running", model="a") == 1
    assert value(metrics, "modeld_model_in_flight", model="a") == 5
    assert value(metrics, "modeld_model_memory_current_bytes", model="a") == 123456
    assert value(metrics, "modeld_model_memory_max_bytes", model="a") == 256 << 20
    assert value(metrics, "modeld_model_gpu_memory_bytes", model="a") == 1 << 30
    assert source.models["b"].status.memory_max == UINT64_MAX
    assert value(metrics, "modeld_model_memory_max_bytes", model="b") == math.inf
    assert value(metrics, "modeld_max_loaded") == 2
    assert value(metrics, "modeld_memory_budget_bytes") == 8 << 30
    assert value(metrics, "modeld_models", state="unloaded") == 2  # attach knows the models


def test_a_model_removed_by_a_reload_disappears_from_every_metric() -> None:
    source = FakeSupervisor({"a": FakeOwner("a"), "b": FakeOwner("b")})
    metrics = Metrics(source)
    b = Model(metrics, "b")
    b.go(L, R)
    metrics.request_finished("b", "/v1/completions", 200, 0.1)
    metrics.first_token("b", "/v1/completions", 0.1)
    b.go(U, X)
    metrics.on_unloaded("b", "shutdown")
    assert len(with_model(metrics, "b")) > 50
    del source.models["b"]
    metrics.sync_models(source.models)
    assert with_model(metrics, "b") == []
    assert value(metrics, "modeld_models", state="unloaded") == 1
    # a request for it that ends after the reload is no longer counted under its name
    metrics.request_finished("b", "/v1/completions", 200, 0.1)
    assert with_model(metrics, "b") == []
    # added again: it starts from zero
    source.models["b"] = FakeOwner("b")
    metrics.sync_models(source.models)
    assert value(metrics, "modeld_loads_total", model="b", result="loaded") == 0
    assert value(metrics, "modeld_model_state", model="b", state="unloaded") == 1


def test_get_metrics_serves_the_registry_in_the_text_format() -> None:
    source = FakeSupervisor({"a": FakeOwner("a")})
    metrics = Metrics(source)
    metrics.request_finished("a", "/v1/completions", 200, 0.1)

    async def scenario() -> tuple[int, str, str]:
        app = build_app(source, metrics=metrics)  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            response = await client.get("/metrics")
            return response.status, response.headers["Content-Type"], await response.text()

    status, content_type, text = asyncio.run(scenario())
    assert status == 200
    assert content_type == CONTENT_TYPE
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["modeld_requests"].type == "counter"
    assert families["modeld_load_duration_seconds"].type == "histogram"
    assert families["modeld_requests_waiting"].type == "gauge"
