"""The eviction engine with real backends and scopes: groups, pins, busy models, timeouts,
host-memory fit, and the completions route that makes models busy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import pytest
from busclient import SignalRecorder, call, connect
from dbus_next.signature import Variant
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

BIG = 'concurrency_groups = ["big"]\n'
MODELS = {
    "g1": reference_model(extra=BIG),
    "g2": reference_model(extra=BIG),
    "keep": reference_model(extra='concurrency_groups = ["solo"]\npinned = true\n'),
    "rival": reference_model(extra='concurrency_groups = ["solo"]\n'),
    "talk": reference_model(options=("predict_delay=1.5",)),
    "other": reference_model(),
    "idle": reference_model(extra='idle_timeout = "1s"\n'),
    "hung": reference_model(options=("predict_delay=60",), extra='busy_timeout = "1s"\n'),
    "stuck": reference_model(options=("predict_delay=60",)),
    "fat": reference_model(memory_max="600M", options=("alloc_mb=300",)),
    "lean": reference_model(memory_max="800M"),
    "huge": reference_model(memory_max="2G"),
}


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = deploy(
        sandbox,
        tmp_path_factory.mktemp("modeld-evict"),
        MODELS,
        daemon='memory_budget = "1G"\neviction_retries = 4\neviction_retry_interval = "0.5s"\n',
    )
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


@pytest.fixture(autouse=True)
def unload_all(modeld: Modeld) -> Iterator[None]:
    yield
    modeld.sandbox.busctl(
        "set-property", "org.modeld1", "/org/modeld1", "org.modeld1.Manager", "MaxLoaded", "u", "0"
    )
    for name in MODELS:
        modeld.unload(name, force=True, check=False)
    assert modeld.scopes() == []


def record_unloads(modeld: Modeld, action: Any, names: list[str]) -> dict[str, list[str]]:
    """Run ``action`` (sync, in a thread) and collect ModelUnloaded reasons for ``names``."""

    async def scenario() -> dict[str, list[str]]:
        async with connect(modeld.sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            await asyncio.to_thread(action)
            await recorder.wait_for(lambda: all(recorder.unloaded(n) for n in names), 20)
            return {n: recorder.unloaded(n) for n in names}

    return asyncio.run(scenario())


def complete(modeld: Modeld, model: str, **extra: Any) -> tuple[int, Any]:
    return modeld.http_post("/v1/completions", {"model": model, "prompt": "The sea", **extra})


def test_completions_answer_in_openai_shape_and_load_on_demand(modeld: Modeld) -> None:
    status, body = complete(modeld, "other", max_tokens=5, temperature=0)
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "other"
    assert body["choices"][0]["text"].strip()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    assert modeld.prop("other", "State") == "ready"
    assert modeld.prop("other", "LastUsed") > 0
    again = complete(modeld, "other", max_tokens=5, temperature=0)[1]
    assert again["choices"][0]["text"] == body["choices"][0]["text"]  # greedy is deterministic
    assert complete(modeld, "nope")[0] == 404
    assert complete(modeld, "other", max_tokens="many")[0] == 400
    assert modeld.http_post("/v1/completions", [1])[0] == 400


def test_loading_a_group_member_evicts_the_others(modeld: Modeld) -> None:
    modeld.load("g1")
    reasons = record_unloads(modeld, lambda: modeld.load("g2"), ["g1"])
    assert reasons == {"g1": ["group"]}
    assert modeld.prop("g2", "State") == "ready"
    assert modeld.prop("g1", "State") == "unloaded"
    assert modeld.prop("g2", "ConcurrencyGroups") == ["big"]


def test_a_pinned_group_member_is_never_evicted(modeld: Modeld) -> None:
    modeld.load("keep")
    proc = modeld.load("rival", check=False)
    assert proc.returncode != 0
    assert "cannot be loaded without evicting pinned model keep (group)" in proc.stderr
    assert modeld.prop("keep", "State") == "ready"
    assert modeld.prop("rival", "State") == "unloaded"


def _set_cap(modeld: Modeld, cap: int) -> None:
    modeld.sandbox.busctl(
        "set-property",
        "org.modeld1",
        "/org/modeld1",
        "org.modeld1.Manager",
        "MaxLoaded",
        "u",
        str(cap),
    )


def test_a_busy_model_is_waited_for_then_evicted(modeld: Modeld) -> None:
    modeld.load("talk")
    _set_cap(modeld, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        request = pool.submit(complete, modeld, "talk", max_tokens=3)
        modeld.wait_state("talk", {"busy"})
        started = time.monotonic()
        reasons = record_unloads(modeld, lambda: modeld.load("other"), ["talk"])
        waited = time.monotonic() - started
        status, _ = request.result(timeout=30)
    assert status == 200, "the request in flight was not disturbed"
    assert reasons == {"talk": ["lru"]}
    assert waited > 0.5  # it waited for the request (1.5 s) instead of killing it
    assert modeld.prop("other", "State") == "ready"


def test_a_model_busy_too_long_makes_the_load_fail_with_busy_unless_forced(
    modeld: Modeld,
) -> None:
    modeld.load("stuck")
    _set_cap(modeld, 1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        request = pool.submit(complete, modeld, "stuck")
        modeld.wait_state("stuck", {"busy"})

        async def load(force: bool) -> tuple[str | None, str]:
            async with connect(modeld.sandbox.bus_address) as bus:
                options = {"wait": Variant("b", True), "force": Variant("b", force)}
                reply = await call(bus, "Load", "sa{sv}", ["other", options])
                return reply.error_name, (reply.body or [""])[0]

        error, message = asyncio.run(load(False))
        assert error == "org.modeld1.Error.Busy"
        assert "stuck" in message and "still busy after 2s" in message
        assert modeld.prop("stuck", "State") == "busy"
        error, message = asyncio.run(load(True))
        assert error is None, message
        status, _body = request.result(timeout=30)
    assert status == 502  # the forced eviction took the backend away under the request
    assert modeld.prop("stuck", "State") == "unloaded"


def test_idle_models_are_unloaded_after_their_idle_timeout(modeld: Modeld) -> None:
    reasons = record_unloads(modeld, lambda: modeld.load("idle"), ["idle"])
    assert reasons == {"idle": ["idle"]}
    assert modeld.prop("idle", "State") == "unloaded"
    assert modeld.scopes() == []


def test_a_backend_busy_past_its_busy_timeout_is_killed(modeld: Modeld) -> None:
    reasons = record_unloads(modeld, lambda: complete(modeld, "hung"), ["hung"])
    assert reasons == {"hung": ["busy-timeout"]}
    assert modeld.prop("hung", "State") == "unloaded"
    assert modeld.backend_processes() == []
    assert "busy for 1s (busy_timeout 1s): killing its backend" in modeld.sandbox.journal(
        unit="modeld.service"
    )


def test_host_memory_fit_evicts_what_does_not_fit(modeld: Modeld) -> None:
    modeld.load("fat")
    assert modeld.prop("fat", "MemoryCurrent") > 300 * 1024 * 1024
    reasons = record_unloads(modeld, lambda: modeld.load("lean"), ["fat"])
    assert reasons == {"fat": ["memory"]}
    assert modeld.prop("lean", "State") == "ready"


def test_a_model_bigger_than_the_budget_is_refused_at_once(modeld: Modeld) -> None:
    modeld.load("other")
    proc = modeld.load("huge", check=False)
    assert proc.returncode != 0
    assert "huge needs 2.0 GiB of memory (memory_max) but the budget" in proc.stderr
    assert "1.0 GiB" in proc.stderr
    assert modeld.prop("other", "State") == "ready"  # nothing was evicted for it
