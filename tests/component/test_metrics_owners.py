"""The metrics fed by real owners' events (real reference backends, fake systemd, no sleeps):
what the owners publish means what the metrics say (a load, a failed load, an unload, a
re-adoption that is not a load)."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_owner_use import Observer, host, run

from modeld.core.states import ModelState
from modeld.errors import LoadFailed
from modeld.metrics import Metrics
from modeld.supervisor.owner import ModelOwner
from modeld.supervisor.spawn import GatedProcess
from modeld.supervisor.status import StatusChange


class MetricsObserver(Observer):
    """The test's observer, also fanning the events out to the metrics (as the daemon does)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def on_status_changed(self, change: StatusChange) -> None:
        self.metrics.on_status_changed(change)
        super().on_status_changed(change)

    def on_unloaded(self, model: str, reason: str) -> None:
        self.metrics.on_unloaded(model, reason)
        super().on_unloaded(model, reason)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    text = metrics.exposition().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def test_loads_failures_unloads_and_a_readoption_as_the_owners_report_them(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        metrics.sync_models(["a", "bad"])
        async with host(tmp_path) as h:
            h.observer = observer = MetricsObserver(metrics)
            a = await h.loaded("a")
            assert value(metrics, "modeld_loads_total", model="a", result="loaded") == 1
            assert value(metrics, "modeld_load_duration_seconds_count", model="a") == 1
            assert value(metrics, "modeld_model_state", model="a", state="ready") == 1

            bad = h.owner("bad", 'options.Options = ["fail_load=no weights"]\n')
            with pytest.raises(LoadFailed):
                await (await bad.request_load())
            assert value(metrics, "modeld_loads_total", model="bad", result="failed") == 1
            assert value(metrics, "modeld_unloads_total", model="bad", reason="failed") == 1
            assert value(metrics, "modeld_models", state="failed") == 1

            # modeld restarts: the owner detaches, a new one re-adopts the running backend
            (record,) = h.context.records.load_all().values()
            assert a._backend is not None
            detached = a._backend.process  # still our child: reaped below, as init would
            assert isinstance(detached, GatedProcess)
            await a.detach()
            h.owners.remove(a)
            adopter = ModelOwner(a.config, h.context, observer)
            h.owners.append(adopter)
            assert await adopter.adopt(record)
            assert adopter.status.state is ModelState.READY
            assert value(metrics, "modeld_loads_total", model="a", result="loaded") == 1

            await (await adopter.request_unload("requested"))
            assert value(metrics, "modeld_unloads_total", model="a", reason="requested") == 1
            count = value(metrics, "modeld_model_age_at_unload_seconds_count", model="a",
                          reason="requested")  # fmt: skip
            assert count == 1
            assert value(metrics, "modeld_models", state="unloaded") == 1
            detached._popen.wait(10)

    run(scenario)
