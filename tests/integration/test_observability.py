"""What operators watch, against a real modeld in a real systemd: ``GET /metrics`` after
loads, an eviction, a failed load, an unload and a reload; and the journal field
``MODELD_MODEL`` on both modeld's lines and the backend's lines about one model."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

MODELS = {
    "m1": reference_model(memory_max="200M"),
    "m2": reference_model(),
    "slow": reference_model(options=("predict_delay=3",)),
    "bad": reference_model(options=("fail_load=no weights here",)),
    "gone": reference_model(),
}

Labels = frozenset[tuple[str, str]]


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    config_dir = tmp_path_factory.mktemp("modeld-observability")
    deployment = deploy(sandbox, config_dir, MODELS, daemon="max_loaded = 1\n")
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])
    assert deployment.scopes() == []


def scrape(modeld: Modeld) -> dict[tuple[str, Labels], float]:
    status, content_type, text = modeld.http_text("/metrics")
    assert status == 200
    assert content_type.startswith("text/plain; version=")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(samples: dict[tuple[str, Labels], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_metrics_follow_loads_an_eviction_a_failure_an_unload_and_a_reload(
    modeld: Modeld,
) -> None:
    s = scrape(modeld)
    assert any(k[0] == "modeld_build_info" for k in s)
    assert get(s, "modeld_models", state="unloaded") == len(MODELS)
    assert get(s, "modeld_max_loaded") == 1

    modeld.load("m1")
    s = scrape(modeld)
    assert get(s, "modeld_loads_total", model="m1", result="loaded") == 1
    assert get(s, "modeld_load_duration_seconds_count", model="m1") == 1
    load_seconds = get(s, "modeld_load_duration_seconds_sum", model="m1")
    assert load_seconds is not None and 0 < load_seconds < 30
    assert get(s, "modeld_models", state="ready") == 1
    assert get(s, "modeld_model_state", model="m1", state="ready") == 1
    memory = get(s, "modeld_model_memory_current_bytes", model="m1")
    assert memory is not None and memory > 1024 * 1024  # the scope's cgroup, read at scrape
    assert get(s, "modeld_model_memory_max_bytes", model="m1") == 200 * 1024 * 1024

    modeld.load("m2")  # max_loaded = 1: m1 is evicted (lru)
    s = scrape(modeld)
    assert get(s, "modeld_unloads_total", model="m1", reason="lru") == 1
    assert get(s, "modeld_model_age_at_unload_seconds_count", model="m1", reason="lru") == 1
    assert get(s, "modeld_loads_total", model="m2", result="loaded") == 1
    assert get(s, "modeld_model_state", model="m1", state="unloaded") == 1
    assert get(s, "modeld_model_memory_current_bytes", model="m1") == 0

    assert modeld.load("bad", check=False).returncode != 0
    s = scrape(modeld)
    assert get(s, "modeld_loads_total", model="bad", result="failed") == 1
    assert get(s, "modeld_unloads_total", model="bad", reason="failed") == 1
    assert get(s, "modeld_models", state="failed") == 1
    assert get(s, "modeld_unloads_total", model="m2", reason="lru") == 1  # bad made room

    modeld.load("m2")
    modeld.unload("m2")
    s = scrape(modeld)
    assert get(s, "modeld_loads_total", model="m2", result="loaded") == 2
    assert get(s, "modeld_unloads_total", model="m2", reason="requested") == 1
    assert get(s, "modeld_model_age_at_unload_seconds_count", model="m2", reason="lru") == 1

    del modeld.models["gone"]
    modeld.write_config()
    modeld.call("Reload")
    s = scrape(modeld)
    assert not [key for key in s if ("model", "gone") in key[1]]
    assert get(s, "modeld_models", state="unloaded") == len(MODELS) - 2  # bad failed, gone


def test_requests_waiting_and_running_are_read_when_scraped(modeld: Modeld) -> None:
    done = threading.Event()
    result: list[Any] = []

    def complete() -> None:
        result.append(modeld.http_post("/v1/completions", {"model": "slow", "prompt": "a"}))
        done.set()

    worker = threading.Thread(target=complete)
    worker.start()
    try:
        modeld.wait_state("slow", {"busy"})  # its request holds the backend for 3 s
        s = scrape(modeld)
        assert get(s, "modeld_model_in_flight", model="slow") == 1
        assert get(s, "modeld_requests_running", model="slow") == 1
        assert get(s, "modeld_requests_waiting", model="slow") == 0
        assert get(s, "modeld_models", state="busy") == 1
    finally:
        worker.join(30)
    assert done.is_set() and result[0][0] == 200
    s = scrape(modeld)
    assert get(s, "modeld_requests_running", model="slow") == 0
    assert get(s, "modeld_model_in_flight", model="slow") == 0
    modeld.unload("slow")


def journal_entries(sandbox: Sandbox, *matches: str) -> list[dict[str, Any]]:
    """Entries matching ``matches`` (journalctl field matches), after journald has
    processed everything sent so far (``journalctl --sync`` inside the sandbox)."""
    sandbox.exec("journalctl", "--sync")
    proc = subprocess.run(
        ["journalctl", "-D", str(sandbox.journal_dir), "--no-pager", "-o", "json", *matches],
        capture_output=True,
        text=True,
        check=False,
    )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def message(entry: dict[str, Any]) -> str:
    value = entry.get("MESSAGE", "")
    return bytes(value).decode() if isinstance(value, list) else str(value)


def test_journalctl_modeld_model_shows_modelds_and_the_backends_lines_for_one_model(
    modeld: Modeld,
) -> None:
    sb = modeld.sandbox
    modeld.load("m1")
    unit = modeld.prop("m1", "Unit")
    assert len(modeld.unit_pids(unit)) == 2  # the backend and its log relay, in its scope
    modeld.load("m2")  # evicts m1: another model's lines around it in time
    modeld.unload("m2")

    entries = [e for e in journal_entries(sb, "MODELD_MODEL=m1") if e.get("MODELD_UNIT") == unit]
    backend = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "m1"]
    own = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "modeld"]
    assert "listening on unix:/run/modeld/backends/m1/backend.sock" in " ".join(
        map(message, backend)
    )
    assert all(e["_SYSTEMD_UNIT"] == unit for e in backend)  # sent from inside the scope
    own_text = "\n".join(map(message, own))
    assert "model m1: loaded in" in own_text
    assert "model m1: ready -> unloading" in own_text
    assert all(e["_SYSTEMD_UNIT"] == "modeld.service" for e in own)

    every = journal_entries(sb, "MODELD_MODEL=m1")
    text = "\n".join(map(message, every))
    assert "model m1: unloaded -> loading" in text  # before it had a scope: no MODELD_UNIT
    assert "m1 unloaded (lru)" in text  # logged by the daemon, in the owner's task
    assert not [e for e in every if "m2" in message(e)]
    assert not [e for e in every if e.get("MODELD_UNIT", unit).startswith("modeld-backend-m2")]
    m2 = journal_entries(sb, "MODELD_MODEL=m2")
    assert m2 and not [e for e in m2 if "m1" in message(e)]
    # nothing of the relays is left once their backends are gone
    assert "journald.py" not in sb.exec("ps", "-eo", "args").stdout
