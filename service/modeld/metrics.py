"""modeld's Prometheus metrics (``GET /metrics``), in a registry of their own.

Two kinds of figures:

- **Event-fed**: model states, loads, unloads and the ages of unloaded models come from the
  owners' events (the daemon forwards :meth:`Metrics.on_status_changed` and
  :meth:`Metrics.on_unloaded`); requests from the HTTP layer (:meth:`request_finished`,
  :meth:`first_token`). Nothing is polled.
- **Read at scrape time** (:class:`_ScrapeCollector`): queue depth, requests running, in
  flight, memory and GPU memory of each configured model, and manager figures.

Label values are bounded: ``model`` is a configured model's name (a request for an unknown
model is counted under ``model=""``), ``reason`` one of :data:`UNLOAD_REASONS`, ``route`` a
path template chosen by the HTTP layer. Models removed by a reload disappear
(:meth:`Metrics.sync_models`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from modeld import __version__
from modeld.core.states import ModelState
from modeld.supervisor.status import ModelStatus, StatusChange
from modeld.units import UINT64_MAX

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

UNKNOWN_MODEL = ""
"""The ``model`` label of requests that named no configured model (never a client string)."""

UNLOAD_REASONS = (
    "requested",
    "lru",
    "group",
    "memory",
    "gpu-memory",
    "pressure",
    "idle",
    "busy-timeout",
    "crashed",
    "oom",
    "failed",
    "shutdown",
)
"""The reasons of ``ModelUnloaded`` (README); anything else is counted as ``other``."""

LOAD_RESULTS = ("loaded", "failed", "cancelled")
"""How a load ended: ready, failed (crash, error, stall), or cancelled by an unload."""

LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
AGE_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 12 * 3600.0, 86400.0)
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


_M = TypeVar("_M", Counter, Histogram)


class _Owner(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def status(self) -> ModelStatus: ...


class MetricsSource(Protocol):
    """What is read at scrape time (the :class:`~modeld.supervisor.registry.Supervisor`)."""

    @property
    def max_loaded(self) -> int: ...

    def owners(self) -> Iterable[_Owner]: ...

    def queue_figures(self, name: str) -> tuple[int, int]: ...

    def memory_current(self, name: str) -> int: ...


@dataclass
class _Track:
    """What the events told about one model so far."""

    state: ModelState = ModelState.UNLOADED
    loading_since: float | None = None
    adopting: bool = False
    """The load in progress re-adopts a backend an earlier modeld left (not counted)."""
    ready_since: float | None = None
    served_until: float | None = None


class Metrics:
    """All of modeld's metrics; one instance per daemon, fed by events, read by scrapes."""

    def __init__(
        self,
        source: MetricsSource | None = None,
        *,
        memory_budget: int = 0,
        clock: Callable[[], float] = time.monotonic,
        version: str = __version__,
    ) -> None:
        # _created series only double the exposition (0.17+; Debian 12's 0.16 keeps them).
        disable_created = getattr(prometheus_client, "disable_created_metrics", None)
        if disable_created is not None:
            disable_created()
        self.registry = CollectorRegistry()
        self._clock = clock
        self._tracks: dict[str, _Track] = {}
        self._models: set[str] = set()
        self._labelled: dict[str, set[tuple[Counter | Histogram, tuple[str, ...]]]] = {}
        self.memory_budget = memory_budget
        r = self.registry
        build = Gauge("modeld_build_info", "modeld's version", ["version"], registry=r)
        build.labels(version).set(1)
        self._loads = Counter(
            "modeld_loads", "Loads by how they ended", ["model", "result"], registry=r
        )
        self._load_seconds = Histogram(
            "modeld_load_duration_seconds",
            "Time from loading to ready (successful loads)",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self._unloads = Counter(
            "modeld_unloads", "Unloads and evictions by reason", ["model", "reason"], registry=r
        )
        self._age = Histogram(
            "modeld_model_age_at_unload_seconds",
            "How long the model had served (since it became ready) when it was unloaded",
            ["model", "reason"],
            buckets=AGE_BUCKETS,
            registry=r,
        )
        self._requests = Counter(
            "modeld_requests",
            "HTTP requests by model, route and status",
            ["model", "route", "status"],
            registry=r,
        )
        self._request_seconds = Histogram(
            "modeld_request_duration_seconds",
            "HTTP request duration, from accepting it to the last byte",
            ["model", "route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._first_token = Histogram(
            "modeld_time_to_first_token_seconds",
            "From accepting a request to its first generated token",
            ["model", "route"],
            buckets=FIRST_TOKEN_BUCKETS,
            registry=r,
        )
        self._source: MetricsSource | None = None
        r.register(_ScrapeCollector(self))
        if source is not None:
            self.attach(source)

    def attach(self, source: MetricsSource) -> None:
        """Read live figures from ``source`` at scrape time; its models are the known ones."""
        self._source = source
        self.sync_models(owner.name for owner in source.owners())

    # --------------------------------------------------------------------- models

    def sync_models(self, names: Iterable[str]) -> None:
        """The configured models are ``names``: add the new ones (unloaded), drop the rest."""
        wanted = set(names)
        for name in self._models - wanted:
            self._forget(name)
        for name in sorted(wanted - self._models):
            self._add(name)

    def _add(self, name: str) -> None:
        self._models.add(name)
        self._tracks.setdefault(name, _Track())
        for result in LOAD_RESULTS:
            self._child(self._loads, name, result)
        for reason in UNLOAD_REASONS:
            self._child(self._unloads, name, reason)
        self._child(self._load_seconds, name)

    def _forget(self, name: str) -> None:
        self._models.discard(name)
        self._tracks.pop(name, None)
        for metric, labels in self._labelled.pop(name, set()):
            metric.remove(*labels)

    def _child(self, metric: _M, *labels: str) -> _M:
        """The child of ``metric`` for ``labels`` (the first is the model), remembered so
        that it can be removed with its model."""
        self._labelled.setdefault(labels[0], set()).add((metric, labels))
        return metric.labels(*labels)

    def _model_label(self, model: str) -> str:
        return model if model in self._models else UNKNOWN_MODEL

    # ------------------------------------------------------- owner events (fan-out)

    def on_status_changed(self, change: StatusChange) -> None:
        if not change.state_changed:
            return
        if change.model not in self._models:
            self._add(change.model)
        track = self._tracks[change.model]
        now = self._clock()
        old, new = change.before.state, change.after.state
        track.state = new
        if new is ModelState.LOADING:
            track.loading_since = now
            # A fresh load starts without a process; a re-adoption knows its pid already.
            track.adopting = change.after.main_pid != 0
            track.ready_since = track.served_until = None
        elif old is ModelState.LOADING:
            if new.serving:
                track.ready_since = now
            if not track.adopting:
                result = "loaded" if new.serving else "failed"
                if new is ModelState.UNLOADING:
                    result = "cancelled"
                self._child(self._loads, change.model, result).inc()
                if new.serving and track.loading_since is not None:
                    self._child(self._load_seconds, change.model).observe(now - track.loading_since)
            track.loading_since = None
            track.adopting = False
        if old.serving and not new.serving:
            track.served_until = now

    def on_unloaded(self, model: str, reason: str) -> None:
        if model not in self._models:
            self._add(model)
        if reason not in UNLOAD_REASONS:
            reason = "other"
        self._child(self._unloads, model, reason).inc()
        track = self._tracks[model]
        if track.ready_since is not None and track.served_until is not None:
            age = max(0.0, track.served_until - track.ready_since)
            self._child(self._age, model, reason).observe(age)
        track.ready_since = track.served_until = None

    # ------------------------------------------------------------ requests (HTTP)

    def request_finished(self, model: str, route: str, status: int, seconds: float) -> None:
        """A request on ``route`` (a path template) ended with HTTP ``status``.

        ``model`` is what the client asked for; anything but a configured model's name
        (the HTTP layer passes "" when there was none) is counted under ``model=""``.
        """
        label = self._model_label(model)
        self._child(self._requests, label, route, str(int(status))).inc()
        self._child(self._request_seconds, label, route).observe(max(0.0, seconds))

    def first_token(self, model: str, route: str, seconds: float) -> None:
        """The first token of a request on ``route`` was sent ``seconds`` after it began."""
        label = self._model_label(model)
        self._child(self._first_token, label, route).observe(max(0.0, seconds))

    # --------------------------------------------------------------------- output

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (content type :data:`CONTENT_TYPE`)."""
        return prometheus_client.generate_latest(self.registry)

    @property
    def source(self) -> MetricsSource | None:
        return self._source

    def states(self) -> dict[str, ModelState]:
        """Each known model's state, as the events told it."""
        return {name: track.state for name, track in self._tracks.items()}


class _ScrapeCollector:
    """The figures of :class:`Metrics` computed when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Sequence[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        states = metrics.states()
        by_state = GaugeMetricFamily(
            "modeld_models", "Configured models by state", labels=["state"]
        )
        one_hot = GaugeMetricFamily(
            "modeld_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        for state in ModelState:
            by_state.add_metric([str(state)], sum(1 for s in states.values() if s is state))
        for name, current in sorted(states.items()):
            for state in ModelState:
                one_hot.add_metric([name, str(state)], 1 if state is current else 0)
        yield by_state
        yield one_hot
        if metrics.memory_budget:
            yield GaugeMetricFamily(
                "modeld_memory_budget_bytes",
                "Memory for all backends together (MemoryMax of modeld.slice)",
                value=metrics.memory_budget,
            )
        source = metrics.source
        if source is None:
            return
        yield GaugeMetricFamily(
            "modeld_max_loaded", "Most models loaded at once (0: no limit)", value=source.max_loaded
        )
        families = {
            "waiting": GaugeMetricFamily(
                "modeld_requests_waiting",
                "Requests accepted and waiting for the model to load or for a parallel slot",
                labels=["model"],
            ),
            "running": GaugeMetricFamily(
                "modeld_requests_running", "Requests sent to the backend", labels=["model"]
            ),
            "in_flight": GaugeMetricFamily(
                "modeld_model_in_flight",
                "Uses of the model: requests waiting or running, plus open leases",
                labels=["model"],
            ),
            "memory": GaugeMetricFamily(
                "modeld_model_memory_current_bytes",
                "Memory of the backend's scope (cgroup)",
                labels=["model"],
            ),
            "memory_max": GaugeMetricFamily(
                "modeld_model_memory_max_bytes",
                "MemoryMax of the backend's scope (+Inf: no limit)",
                labels=["model"],
            ),
            "gpu": GaugeMetricFamily(
                "modeld_model_gpu_memory_bytes",
                "GPU memory the backend uses (NVML)",
                labels=["model"],
            ),
        }
        for owner in sorted(source.owners(), key=lambda o: o.name):
            name, status = owner.name, owner.status
            waiting, running = source.queue_figures(name)
            memory_max = math.inf if status.memory_max >= UINT64_MAX else status.memory_max
            families["waiting"].add_metric([name], waiting)
            families["running"].add_metric([name], running)
            families["in_flight"].add_metric([name], status.in_flight)
            families["memory"].add_metric([name], source.memory_current(name))
            families["memory_max"].add_metric([name], memory_max)
            families["gpu"].add_metric([name], status.gpu_memory)
        yield from families.values()
