"""The org.modeld1 D-Bus API (version 1): a thin adapter over the supervisor.

Each method declares its authorization rule (checked by :mod:`modeld.bus.gate` before the
method runs), converts its arguments, calls the supervisor and converts the result. Errors
become ``org.modeld1.Error.*`` replies with one line of text; no traceback ever crosses the
bus.
"""

# dbus-next evaluates annotations as D-Bus signatures (modeld.bus.signatures), hence no
# ``from __future__ import annotations`` here and a mypy override for this module.

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from modeld import __version__
from modeld.bus.authorization import Action, Authorizer, Rule, authorized, current_caller
from modeld.bus.connection import (
    INTERNAL_ERROR,
    DBusError,
    ModeldMessageBus,
    PropertyAccess,
    Variant,
    dbus_property,
    method,
    signal,
)
from modeld.bus.gate import ApiInterface, Gate
from modeld.bus.signatures import (
    BOOLEAN,
    ENDPOINT_AND_LEASE,
    MODEL_LIST,
    NAME_AND_PATH,
    NAME_PATH_AND_REASON,
    OBJECT_PATH,
    OPTIONS,
    STRING,
    STRINGS,
    UINT32,
    UINT64,
)
from modeld.coalesce import Coalescer
from modeld.config import ModelConfig
from modeld.errors import AccessDenied, InvalidArgs, ModeldError, NoSuchModel, PinnedModel
from modeld.naming import (
    MANAGER_INTERFACE,
    MANAGER_PATH,
    MODEL_INTERFACE,
    model_object_path,
    shown,
)
from modeld.supervisor.registry import Supervisor
from modeld.supervisor.status import ModelStatus, StatusChange

log = logging.getLogger(__name__)

USE_PUBLISH_DELAY = 0.05
"""Seconds a change of a model's use alone may wait to be sent (see :class:`BusService`)."""

_F = TypeVar("_F", bound=Callable[..., Coroutine[Any, Any, Any]])
_T = TypeVar("_T")

_STATUS_PROPERTIES: tuple[tuple[str, Callable[[ModelStatus], object]], ...] = (
    ("State", lambda s: str(s.state)),
    ("Unit", lambda s: s.unit),
    ("ControlGroup", lambda s: s.control_group),
    ("MainPID", lambda s: s.main_pid),
    ("Endpoint", lambda s: s.endpoint),
    ("MemoryMax", lambda s: s.memory_max),
    ("MemoryPeak", lambda s: s.memory_peak),
    ("LastUsed", lambda s: s.last_used_us),
    ("InFlight", lambda s: s.in_flight),
    ("Pinned", lambda s: s.pinned),
    ("LastError", lambda s: s.last_error),
    ("LoadCount", lambda s: s.load_count),
    ("RetryAfter", lambda s: s.retry_after_us),
    ("Gpu", lambda s: s.gpu),
    ("GpuMemory", lambda s: s.gpu_memory),
)
"""Model properties that mirror a status field, with their typed accessors."""

_CONFIG_PROPERTIES: tuple[tuple[str, Callable[[ModelConfig], object]], ...] = (
    ("Backend", lambda c: c.backend),
    ("ConcurrencyGroups", lambda c: list(c.concurrency_groups)),
)
"""Model properties read from its configuration (a reload changes them), with their accessors."""

_MANAGER_PROPERTIES: tuple[tuple[str, Callable[[Supervisor], object]], ...] = (
    ("LoadedCount", lambda s: s.loaded_count()),
    ("MaxLoaded", lambda s: s.max_loaded),
    ("MemoryBudget", lambda s: s.config.daemon.memory_budget),
)
"""Manager properties that a status change, a write or a reload changes, with their accessors."""


def _read(
    accessors: tuple[tuple[str, Callable[[_T], object]], ...], source: _T
) -> dict[str, object]:
    return {name: read(source) for name, read in accessors}


def _changed(before: Mapping[str, object], after: Mapping[str, object]) -> dict[str, object]:
    return {name: value for name, value in after.items() if before.get(name) != value}


def _replies_errors(fn: _F) -> _F:
    """Turn modeld errors into named D-Bus errors and anything else into a one-line Internal."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except ModeldError as err:
            log.warning("%s: %s", fn.__name__, err)
            raise DBusError(err.dbus_name, err.message) from None
        except DBusError:
            raise
        except Exception as err:
            log.exception("internal error in %s", fn.__name__)
            raise DBusError(
                INTERNAL_ERROR, f"internal error in {fn.__name__}: {err}; see modeld's journal"
            ) from None

    return wrapper  # type: ignore[return-value]


class _Options:
    """Typed access to an ``a{sv}`` options argument; unknown keys are refused."""

    def __init__(self, options: dict[str, Variant], known: tuple[str, ...]) -> None:
        for key in options:
            if key not in known:
                raise InvalidArgs(f"unknown option {key!r}; known options: {', '.join(known)}")
        self._options = options

    def flag(self, key: str, default: bool = False) -> bool:
        variant = self._options.get(key)
        if variant is None:
            return default
        if variant.signature != "b":
            raise InvalidArgs(f"option {key!r} must be a boolean (b), not {variant.signature!r}")
        return bool(variant.value)


def _consume(future: asyncio.Future[None]) -> None:
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


class _Requests:
    """The operations shared by the Manager and Model interfaces."""

    def __init__(self, supervisor: Supervisor, bus: ModeldMessageBus) -> None:
        self.supervisor = supervisor
        self.bus = bus

    async def load(self, name: str, options: dict[str, Variant]) -> str:
        opts = _Options(options, ("wait", "force"))
        wait = opts.flag("wait")
        force = opts.flag("force")
        done = await self.supervisor.load(name, force=force)
        if wait:
            await done
        else:
            _consume(done)
        return model_object_path(name)

    async def unload(self, name: str, options: dict[str, Variant]) -> None:
        """Unload ``name``; ``wait`` (default true) replies only once it is unloaded.

        The gate authorized ``use`` (``manage`` with ``force``); whether the model is pinned,
        which needs ``manage`` too, is the owner's to decide. If it refuses for the pin,
        polkit is asked for ``manage`` and the unload is asked for again.
        """
        opts = _Options(options, ("force", "wait"))
        force = opts.flag("force")
        wait = opts.flag("wait", default=True)
        caller = current_caller()
        manage = caller is not None and caller.holds(Action.MANAGE)
        try:
            done = await self.supervisor.unload(name, force=force, manage=manage)
        except PinnedModel:
            if caller is None or manage:
                raise
            await caller.require(Action.MANAGE, f"Unload {name} (pinned)")
            done = await self.supervisor.unload(name, force=force, manage=True)
        if wait:
            try:
                await done
            except PinnedModel as err:  # pinned while the unload waited for the model's use
                raise AccessDenied(f"Unload {name} (pinned) needs {Action.MANAGE}: {err}") from None
        else:
            _consume(done)


class ModelInterface(ApiInterface):
    """org.modeld1.Model for one configured model."""

    def __init__(self, model_name: str, requests: _Requests) -> None:
        super().__init__(MODEL_INTERFACE)
        self._model_name = model_name
        self._requests = requests

    @property
    def _supervisor(self) -> Supervisor:
        return self._requests.supervisor

    def model_of(self, args: Mapping[str, Any]) -> str:
        return self._model_name

    def _status(self) -> Any:
        return self._supervisor.status(self._model_name)

    def model_config(self) -> ModelConfig:
        """The model's configuration as the supervisor has it (a reload replaces it at once)."""
        config = self._supervisor.config.models.get(self._model_name)
        if config is None:
            raise NoSuchModel(f"no model named {shown(self._model_name)} is configured")
        return config

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> STRING:
        return self._model_name

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> STRING:
        return self.model_config().backend

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> STRING:
        return str(self._status().state)

    @dbus_property(access=PropertyAccess.READ)
    def Unit(self) -> STRING:
        return self._status().unit

    @dbus_property(access=PropertyAccess.READ)
    def ControlGroup(self) -> STRING:
        return self._status().control_group

    @dbus_property(access=PropertyAccess.READ)
    def MainPID(self) -> UINT32:
        return self._status().main_pid

    @dbus_property(access=PropertyAccess.READ)
    def Endpoint(self) -> STRING:
        return self._status().endpoint

    @dbus_property(access=PropertyAccess.READ)
    def MemoryCurrent(self) -> UINT64:
        return self._supervisor.memory_current(self._model_name)

    @dbus_property(access=PropertyAccess.READ)
    def MemoryMax(self) -> UINT64:
        return self._status().memory_max

    @dbus_property(access=PropertyAccess.READ)
    def MemoryPeak(self) -> UINT64:
        """The learned peak memory of its backends (0: not known yet); admission counts
        the model with it plus a margin instead of MemoryMax."""
        return self._status().memory_peak

    @dbus_property(access=PropertyAccess.READ)
    def GpuMemory(self) -> UINT64:
        return self._status().gpu_memory

    @dbus_property(access=PropertyAccess.READ)
    def Gpu(self) -> STRING:
        return self._status().gpu

    @dbus_property(access=PropertyAccess.READ)
    def LastUsed(self) -> UINT64:
        return self._status().last_used_us

    @dbus_property(access=PropertyAccess.READ)
    def InFlight(self) -> UINT32:
        return self._status().in_flight

    @dbus_property(access=PropertyAccess.READ)
    def Pinned(self) -> BOOLEAN:
        return self._status().pinned

    @dbus_property(access=PropertyAccess.READ)
    def ConcurrencyGroups(self) -> STRINGS:
        return list(self.model_config().concurrency_groups)

    @dbus_property(access=PropertyAccess.READ)
    def LastError(self) -> STRING:
        return self._status().last_error

    @dbus_property(access=PropertyAccess.READ)
    def LoadCount(self) -> UINT32:
        return self._status().load_count

    @dbus_property(access=PropertyAccess.READ)
    def RetryAfter(self) -> UINT64:
        return self._status().retry_after_us

    @method()
    @authorized(Rule.LOAD)
    @_replies_errors
    async def Load(self, options: OPTIONS) -> OBJECT_PATH:
        return await self._requests.load(self._model_name, options)

    @method()
    @authorized(Rule.UNLOAD)
    @_replies_errors
    async def Unload(self, options: OPTIONS) -> None:
        await self._requests.unload(self._model_name, options)

    @method()
    @authorized(Rule.MANAGE)
    @_replies_errors
    async def SetPinned(self, pinned: BOOLEAN) -> None:
        self._supervisor.set_pinned(self._model_name, pinned)


class ManagerInterface(ApiInterface):
    """org.modeld1.Manager at /org/modeld1."""

    def __init__(self, requests: _Requests, reload: Callable[[], Awaitable[None]]) -> None:
        super().__init__(MANAGER_INTERFACE)
        self._requests = requests
        self._reload = reload

    @property
    def _supervisor(self) -> Supervisor:
        return self._requests.supervisor

    @method()
    @authorized(Rule.LOAD)
    @_replies_errors
    async def Load(self, name: STRING, options: OPTIONS) -> OBJECT_PATH:
        return await self._requests.load(name, options)

    @method()
    @authorized(Rule.UNLOAD)
    @_replies_errors
    async def Unload(self, name: STRING, options: OPTIONS) -> None:
        await self._requests.unload(name, options)

    @method()
    @authorized(Rule.READ)
    def ListModels(self) -> MODEL_LIST:
        return [
            [o.name, str(o.status.state), o.config.backend, model_object_path(o.name)]
            for o in self._supervisor.owners()
        ]

    @method()
    @authorized(Rule.READ)
    @_replies_errors
    async def GetModel(self, name: STRING) -> OBJECT_PATH:
        self._supervisor.owner(name)
        return model_object_path(name)

    @method()
    @authorized(Rule.MANAGE)
    @_replies_errors
    async def Reload(self) -> None:
        await self._reload()

    @method()
    @authorized(Rule.USE)
    @_replies_errors
    async def Acquire(self, name: STRING, options: OPTIONS) -> ENDPOINT_AND_LEASE:
        _Options(options, ())
        caller = current_caller()
        lease = await self._supervisor.acquire(name, caller.uid if caller else None)
        self._requests.bus.close_after_send(lease.client_fd)
        return [lease.endpoint, lease.client_fd]

    @signal()
    def ModelLoaded(self, name: str, path: str) -> NAME_AND_PATH:
        return [name, path]

    @signal()
    def ModelUnloaded(self, name: str, path: str, reason: str) -> NAME_PATH_AND_REASON:
        return [name, path, reason]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> STRING:
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def LoadedCount(self) -> UINT32:
        return self._supervisor.loaded_count()

    @dbus_property(access=PropertyAccess.READ)
    @authorized(Rule.MANAGE)
    def MaxLoaded(self) -> UINT32:
        """Read-write (api.WRITABLE): the gate authorizes writes, BusService applies them."""
        return self._supervisor.max_loaded

    @dbus_property(access=PropertyAccess.READ)
    def MemoryBudget(self) -> UINT64:
        return self._supervisor.config.daemon.memory_budget

    @dbus_property(access=PropertyAccess.READ)
    def MemoryUsed(self) -> UINT64:
        return self._supervisor.memory_used()


class BusService:
    """Exports the API through the gate, applies property writes, mirrors owner events.

    Every property :data:`api.CHANGES <modeld.bus.api.CHANGES>` says emits is sent in
    ``PropertiesChanged`` when it changes (compared with what was last sent): a model's
    status fields when its owner publishes a change, the manager's figures and the models'
    configured ones after a status change, a write and a reload (:meth:`sync_models`).

    A change of a model's use alone (:attr:`StatusChange.use_only`, which every request
    makes twice) is held back for up to ``use_publish_delay`` seconds and sent with the others
    of that span, as the values then (a value that changed and changed back is not sent).
    Every other change, and every other message modeld sends on the bus (a method's reply,
    a signal, a call), first sends what is held back: nothing modeld sends overtakes a
    change made before it, so a client that asks after a request has ended already has its
    ``PropertiesChanged``.
    """

    def __init__(
        self,
        bus: ModeldMessageBus,
        supervisor: Supervisor,
        reload: Callable[[], Awaitable[None]],
        *,
        authorizer: Authorizer | None = None,
        use_publish_delay: float = USE_PUBLISH_DELAY,
    ) -> None:
        self._supervisor = supervisor
        self._gate = Gate(
            bus,
            authorizer if authorizer is not None else Authorizer(bus),
            write=self._on_property_set,
        )
        self._requests = _Requests(supervisor, bus)
        self.manager = ManagerInterface(self._requests, reload)
        self._models: dict[str, ModelInterface] = {}
        self._sent_manager = _read(_MANAGER_PROPERTIES, supervisor)
        self._sent_configs: dict[str, dict[str, object]] = {}
        self._sent_statuses: dict[str, dict[str, object]] = {}
        self._unsent: dict[str, ModelStatus] = {}
        self._held = Coalescer(self._send_held, use_publish_delay)
        bus.before_send(self._held_first)
        self._gate.export(MANAGER_PATH, self.manager)

    def sync_models(self) -> None:
        """Export an object per configured model, drop those of removed models, and send
        what the configuration changed (call after every reload)."""
        owners = {o.name: o for o in self._supervisor.owners()}
        for name in list(self._models):
            if name not in owners:
                self._gate.unexport(model_object_path(name), self._models.pop(name))
                self._sent_configs.pop(name, None)
                self._sent_statuses.pop(name, None)
                self._unsent.pop(name, None)
        for name in sorted(owners.keys() - self._models.keys()):
            interface = ModelInterface(name, self._requests)
            self._models[name] = interface
            self._sent_configs[name] = _read(_CONFIG_PROPERTIES, interface.model_config())
            self._sent_statuses[name] = _read(_STATUS_PROPERTIES, owners[name].status)
            self._gate.export(model_object_path(name), interface)
        for name, interface in self._models.items():
            now = _read(_CONFIG_PROPERTIES, interface.model_config())
            changed = _changed(self._sent_configs[name], now)
            self._sent_configs[name] = now
            if changed:
                interface.emit_properties_changed(changed)
        self._send_manager_changes()

    def _send_manager_changes(self) -> None:
        now = _read(_MANAGER_PROPERTIES, self._supervisor)
        changed = _changed(self._sent_manager, now)
        self._sent_manager = now
        if changed:
            with contextlib.suppress(Exception):
                self.manager.emit_properties_changed(changed)

    def _on_property_set(self, interface: ApiInterface, prop: str, value: Any) -> None:
        """Apply a write the gate authorized and type-checked (``api.WRITABLE`` lists them)."""
        if interface is not self.manager or prop != "MaxLoaded":
            raise DBusError(
                "org.freedesktop.DBus.Error.PropertyReadOnly", f"property {prop} is read-only"
            )
        self._supervisor.set_max_loaded(int(value))
        log.info("MaxLoaded set to %d", value)
        self._send_manager_changes()

    # -------------------------------------------------------- OwnerObserver interface

    def on_status_changed(self, change: StatusChange) -> None:
        if change.model not in self._models:
            return
        self._unsent[change.model] = change.after
        if change.use_only:
            self._held.soon()
        else:
            self._held.now()

    def _held_first(self) -> None:
        if self._held.pending:
            self._held.now()

    def _send_held(self) -> None:
        unsent, self._unsent = self._unsent, {}
        for name, status in unsent.items():
            now = _read(_STATUS_PROPERTIES, status)
            changed = _changed(self._sent_statuses[name], now)
            self._sent_statuses[name] = now
            if changed:
                self._models[name].emit_properties_changed(changed)
        self._send_manager_changes()

    def on_loaded(self, model: str) -> None:
        self.manager.ModelLoaded(model, model_object_path(model))

    def on_unloaded(self, model: str, reason: str) -> None:
        self.manager.ModelUnloaded(model, model_object_path(model), reason)
