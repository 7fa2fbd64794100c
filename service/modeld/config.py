"""The modeld configuration: the daemon file and one file per model.

The daemon file (:data:`DEFAULT_CONFIG_PATH`, all keys optional)::

    [daemon]
    models_dir = "/etc/modeld/models.d"
    backends_dirs = ["/var/lib/modeld/backends", "/usr/lib/modeld/backends"]
    runtime_dir = "/run/modeld"
    max_loaded = 0                  # 0 = unlimited
    memory_budget = "80%"           # of host RAM
    idle_timeout = "0"              # 0 = never unload idle models
    busy_timeout = "0"
    force_eviction_when_busy = false
    eviction_retries = 30
    eviction_retry_interval = "1s"
    backend_user = ""               # "" = the daemon picks its default
    load_stall_timeout = "120s"     # 0 = no stall detection
    stop_timeout = "10s"            # SIGTERM -> SIGKILL grace, > 0
    max_queue = 16                  # requests that may wait per model (models' default)
    request_timeout = "5m"          # HTTP: longest wait for a model's load and slot; 0 = none
    backend_log_fields = true       # backends' output tagged MODELD_MODEL (a relay per backend)

Relative paths in the daemon file are relative to the directory holding it.

The defaults above are the system's (:func:`system_layout`). A per-user modeld
(``modeld --user``) reads ``$XDG_CONFIG_HOME/modeld/modeld.toml`` and uses the user's
directories instead (:func:`user_layout`); its backends are the user's own
(``$XDG_DATA_HOME/modeld/backends``) followed by the system's (the ``backends_dirs`` of the
system daemon file, else the system defaults).

Each model is ``<models_dir>/<name>.toml``; see :class:`ModelConfig` for its
keys.  Loading never logs: every problem is a :class:`ConfigError` whose
``str()`` is one line naming the file, the (dotted) key and the problem.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, NoReturn, cast

from modeld.units import (
    DURATION_HINT,
    SIZE_HINT,
    UINT64_MAX,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MODEL_OPTIONS_FIELDS",
    "MODEL_OPTIONS_TYPES",
    "UINT64_MAX",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "Layout",
    "ModelConfig",
    "RestartPolicy",
    "default_daemon_config",
    "load_config",
    "load_model_config",
    "model_name_problem",
    "system_layout",
    "user_layout",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/modeld/modeld.toml")
SYSTEM_BACKENDS_DIRS: Final[tuple[Path, ...]] = (
    Path("/var/lib/modeld/backends"),
    Path("/usr/lib/modeld/backends"),
)


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one modeld instance looks and writes unless its daemon file says otherwise: the
    system's (:func:`system_layout`) or one user's (:func:`user_layout`)."""

    config_path: Path
    """The daemon file read when none is given."""
    models_dir: Path
    backends_dirs: tuple[Path, ...]
    runtime_dir: Path
    state_dir: Path
    """Where learned footprints persist when systemd sets no ``$STATE_DIRECTORY``."""
    fallback_config: Path | None = None
    """A daemon file whose ``backends_dirs`` (else :data:`SYSTEM_BACKENDS_DIRS`) follow
    ``backends_dirs`` by default: the system's, for a per-user instance."""
    user: bool = False
    """A per-user instance (session bus, user manager)."""


def system_layout() -> Layout:
    """The system instance's paths: /etc/modeld, /run/modeld, /var/lib/modeld."""
    return Layout(
        config_path=DEFAULT_CONFIG_PATH,
        models_dir=Path("/etc/modeld/models.d"),
        backends_dirs=SYSTEM_BACKENDS_DIRS,
        runtime_dir=Path("/run/modeld"),
        state_dir=Path("/var/lib/modeld"),
    )


def _xdg_dir(environ: Mapping[str, str], name: str, default: Path) -> Path:
    """An XDG base directory: the variable if it holds an absolute path (the specification
    says to ignore relative ones), else ``default``."""
    value = environ.get(name, "")
    return Path(value) if value.startswith("/") else default


def user_layout(environ: Mapping[str, str] = os.environ, uid: int | None = None) -> Layout:
    """The paths of the per-user instance of ``uid`` (default: this process's user).

    ``$XDG_CONFIG_HOME/modeld/`` (``modeld.toml``, ``models.d/``),
    ``$XDG_RUNTIME_DIR/modeld/`` (``/run/user/UID/modeld`` when unset),
    ``$XDG_DATA_HOME/modeld/backends`` then the system's backends, and
    ``$XDG_STATE_HOME/modeld``; the XDG defaults below ``$HOME`` otherwise.
    """
    uid = os.getuid() if uid is None else uid
    home_value = environ.get("HOME", "")
    home = Path(home_value) if home_value.startswith("/") else Path(pwd.getpwuid(uid).pw_dir)
    config = _xdg_dir(environ, "XDG_CONFIG_HOME", home / ".config") / "modeld"
    data = _xdg_dir(environ, "XDG_DATA_HOME", home / ".local" / "share") / "modeld"
    state = _xdg_dir(environ, "XDG_STATE_HOME", home / ".local" / "state") / "modeld"
    runtime = _xdg_dir(environ, "XDG_RUNTIME_DIR", Path(f"/run/user/{uid}")) / "modeld"
    return Layout(
        config_path=config / "modeld.toml",
        models_dir=config / "models.d",
        backends_dirs=(data / "backends",),
        runtime_dir=runtime,
        state_dir=state,
        fallback_config=DEFAULT_CONFIG_PATH,
        user=True,
    )


MODEL_NAME_MAX_BYTES: Final = 200
MAX_FILE_BYTES: Final = 1 << 20
"""A configuration file larger than this is refused unread (not a configuration file)."""
MAX_LOADED_MAX: Final = 2**32 - 1
"""``max_loaded`` is published as D-Bus ``u`` (MaxLoaded)."""
TASKS_MAX_MAX: Final = 2**64 - 2
"""Below systemd's ``infinity`` (UINT64_MAX): TasksMax is a ``t``."""

RestartPolicy = Literal["no", "on-failure"]

OptionKind = Literal["str", "int", "float", "bool", "str[]", "float[]"]

MODEL_OPTIONS_TYPES: Final[Mapping[str, OptionKind]] = MappingProxyType(
    {
        **dict.fromkeys(
            (
                "Model", "MainGPU", "TensorSplit", "ModelFile", "PipelineType", "SchedulerType",
                "CLIPModel", "CLIPSubfolder", "ControlNet", "Tokenizer", "LoraBase", "LoraAdapter",
                "DraftModel", "AudioPath", "Quantization", "LoadFormat", "DType", "MMProj",
                "RopeScaling", "Type", "FlashAttention", "ModelPath", "CacheTypeKey",
                "CacheTypeValue",
            ),
            "str",
        ),
        **dict.fromkeys(
            (
                "ContextSize", "Seed", "NBatch", "NGPULayers", "Threads", "NGQA", "CLIPSkip",
                "SwapSpace", "MaxModelLen", "TensorParallelSize", "LimitImagePerPrompt",
                "LimitVideoPerPrompt", "LimitAudioPerPrompt",
            ),
            "int",
        ),
        **dict.fromkeys(
            (
                "RopeFreqBase", "RopeFreqScale", "RMSNormEps", "CFGScale", "LoraScale",
                "GPUMemoryUtilization", "YarnExtFactor", "YarnAttnFactor", "YarnBetaFast",
                "YarnBetaSlow",
            ),
            "float",
        ),
        **dict.fromkeys(
            (
                "F16Memory", "MLock", "MMap", "VocabOnly", "LowVRAM", "Embeddings", "NUMA", "CUDA",
                "IMG2IMG", "NoMulMatQ", "TrustRemoteCode", "EnforceEager", "DisableLogStatus",
                "NoKVOffload", "Reranking",
            ),
            "bool",
        ),
        **dict.fromkeys(("LoraAdapters", "Options", "Overrides"), "str[]"),
        "LoraScales": "float[]",
    }
)  # fmt: skip
"""The scalar fields of LocalAI's ``ModelOptions`` message and their TOML value kinds
(``int`` fields are int32; ``[]`` marks repeated fields, written as arrays)."""

MODEL_OPTIONS_FIELDS: Final = frozenset(MODEL_OPTIONS_TYPES)
"""Field names of LocalAI's ``ModelOptions`` protobuf message, allowed in ``[options]``."""

_DAEMON_KEYS: Final = (
    "models_dir",
    "backends_dirs",
    "runtime_dir",
    "max_loaded",
    "memory_budget",
    "idle_timeout",
    "busy_timeout",
    "force_eviction_when_busy",
    "eviction_retries",
    "eviction_retry_interval",
    "backend_user",
    "load_stall_timeout",
    "stop_timeout",
    "max_queue",
    "request_timeout",
    "backend_log_fields",
)
_MODEL_KEYS: Final = (
    "backend",
    "model",
    "memory_max",
    "memory_high",
    "gpu_memory",
    "concurrency_groups",
    "pinned",
    "preload",
    "idle_timeout",
    "busy_timeout",
    "parallel",
    "max_queue",
    "restart",
    "user",
    "tasks_max",
    "cpu_weight",
    "options",
)
_MODEL_PATH_OPTIONS: Final = ("Model", "ModelFile")
_URI_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def _one_line(text: str) -> str:
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )


class ConfigError(Exception):
    """A configuration problem a person can fix.

    Attributes:
        file: the file (or directory) with the problem.
        key: the dotted key (``daemon.max_loaded``, ``options.ContextSize``,
            ``concurrency_groups[1]``), or ``None`` for whole-file problems.
        problem: what is wrong, one line.

    ``str(error)`` is a single line: ``<file>: <key>: <problem>`` (or
    ``<file>: <problem>``), with non-printable characters escaped.
    """

    file: str
    key: str | None
    problem: str

    def __init__(self, file: str | os.PathLike[str], key: str | None, problem: str) -> None:
        self.file = os.fspath(file)
        self.key = key
        self.problem = problem
        super().__init__(self.file, key, problem)

    def __str__(self) -> str:
        parts = [self.file] if self.key is None else [self.file, self.key]
        return _one_line(": ".join([*parts, self.problem]))


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The ``[daemon]`` table, with every value parsed and defaults filled in.

    Sizes are bytes (``UINT64_MAX`` = unlimited), durations are seconds
    (``0`` = disabled where the key allows it).  ``backend_user`` is ``None``
    when the daemon should choose its default.
    """

    models_dir: Path
    backends_dirs: tuple[Path, ...]
    runtime_dir: Path
    max_loaded: int
    memory_budget: int
    idle_timeout: float
    busy_timeout: float
    force_eviction_when_busy: bool
    eviction_retries: int
    eviction_retry_interval: float
    backend_user: str | None
    load_stall_timeout: float
    stop_timeout: float
    max_queue: int
    """Requests that may wait for a model (load or slot) before more are refused; the
    default of each model's ``max_queue``."""
    request_timeout: float
    backend_log_fields: bool
    """Tag backends' output with MODELD_MODEL through a log relay in their scope."""
    """Longest time an HTTP request waits for its model to load and for a ``parallel`` slot
    before it is answered 503 (0: no limit); the generation itself is not bounded."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model, from ``<models_dir>/<name>.toml``::

        backend = "reference"       # required: backend name, alias or meta backend
        model = "demo.txt"          # relative paths are joined onto models_dir
        memory_max = "512M"         # default "infinity"; "%" of host RAM allowed
        memory_high = "400M"        # default 90 % of a finite memory_max
        gpu_memory = "0"
        concurrency_groups = ["big"]
        pinned = false
        preload = false             # load when modeld starts (and when a reload adds it)
        idle_timeout = "10m"        # default: the daemon's
        busy_timeout = "5m"         # default: the daemon's
        parallel = 1
        max_queue = 16              # default: the daemon's; requests waiting beyond parallel
        restart = "no"              # or "on-failure"
        user = "modeld"             # default: the daemon's backend_user
        tasks_max = 4096
        cpu_weight = 100            # 1..10000; unset: systemd's default (no CPU controller)
        [options]                   # more ModelOptions fields, by proto name
        ContextSize = 2048

    Invariants: ``name`` passes :func:`model_name_problem`; ``model`` is ``""``,
    a path (absolute, or joined onto the models_dir), or a URI left as
    written; ``memory_max > 0``
    (``UINT64_MAX`` = unlimited); ``memory_high`` is ``None`` only when
    ``memory_max`` is unlimited and no ``memory_high`` was given, and never
    exceeds a finite ``memory_max`` unless it is ``UINT64_MAX``;
    ``parallel >= 1``; ``tasks_max >= 1``; ``cpu_weight`` is None or ``1 <= cpu_weight <= 10000``;
    ``options`` is read-only, keyed by ``ModelOptions`` field names, with
    arrays as tuples.  ``options`` never holds ``Model``/``ModelFile`` when
    ``model`` is set.
    """

    name: str
    backend: str
    model: str
    memory_max: int
    memory_high: int | None
    gpu_memory: int
    concurrency_groups: tuple[str, ...]
    pinned: bool
    preload: bool
    idle_timeout: float
    busy_timeout: float
    parallel: int
    max_queue: int
    restart: RestartPolicy
    user: str | None
    tasks_max: int
    cpu_weight: int | None
    options: Mapping[str, object]
    source: Path


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration.  ``models`` is read-only and ordered by name;
    ``source`` is the daemon file that was read, or ``None`` if none was."""

    daemon: DaemonConfig
    models: Mapping[str, ModelConfig]
    source: Path | None


_MISSING: Final = object()


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:59] + "…"
        return f"string {json.dumps(shown, ensure_ascii=False)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _key_part(name: str) -> str:
    return name if _BARE_KEY_RE.fullmatch(name) else json.dumps(name, ensure_ascii=False)


class _Table:
    """Typed access to one TOML table, producing ConfigErrors with dotted keys."""

    __slots__ = ("_data", "_file", "_prefix")

    def __init__(self, file: Path, data: Mapping[str, object], prefix: str = "") -> None:
        self._file = file
        self._data = data
        self._prefix = prefix

    def key(self, name: str, index: int | None = None) -> str:
        item = "" if index is None else f"[{index}]"
        return f"{self._prefix}{_key_part(name)}{item}"

    def fail(self, name: str, problem: str, index: int | None = None) -> NoReturn:
        raise ConfigError(self._file, self.key(name, index), problem)

    def check_known(self, known: tuple[str, ...]) -> None:
        for name in self._data:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
                self.fail(name, f"unknown key{hint}; known keys: {', '.join(known)}")

    def get(self, name: str) -> object:
        return self._data.get(name, _MISSING)

    def string(self, name: str, default: str) -> str:
        value = self.get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.fail(name, f"expected a string (got {_describe(value)})")
        if "\0" in value:  # D-Bus strings cannot hold NUL (the bus drops such a message)
            self.fail(name, "must not contain NUL characters")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.fail(name, f"expected true or false (got {_describe(value)})")
        return value

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.get(name)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"expected an integer (got {_describe(value)})")
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            self.fail(name, f"must be {bounds} (got {value})")
        return value

    def size(self, name: str, default: str, total: int | None) -> int:
        value = self.get(name)
        raw = default if value is _MISSING else value
        if isinstance(raw, bool) or not isinstance(raw, str | int):
            self.fail(name, f"{SIZE_HINT} (got {_describe(raw)})")
        try:
            return parse_size(raw, total=total)
        except ValueError as exc:
            self.fail(name, str(exc))

    def duration(self, name: str, default: float, positive: bool = False) -> float:
        value = self.get(name)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(name, f"{DURATION_HINT} (got {_describe(value)})")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.fail(name, str(exc))
        if positive and seconds <= 0:
            self.fail(name, f"must be greater than 0 (got {_describe(value)})")
        return seconds

    def path(self, name: str, default: Path, base: Path | None) -> Path:
        value = self.get(name)
        if value is _MISSING:
            return default
        return self._to_path(name, None, value, base)

    def paths(self, name: str, default: tuple[Path, ...], base: Path | None) -> tuple[Path, ...]:
        value = self.get(name)
        if value is _MISSING:
            return default
        if not isinstance(value, list):
            self.fail(name, f"expected an array of paths (got {_describe(value)})")
        return tuple(self._to_path(name, i, item, base) for i, item in enumerate(value))

    def _to_path(self, name: str, index: int | None, value: object, base: Path | None) -> Path:
        if not isinstance(value, str):
            self.fail(name, f"expected a path (got {_describe(value)})", index)
        if not value:
            self.fail(name, "expected a non-empty path", index)
        if "\0" in value:
            self.fail(name, "must not contain NUL characters", index)
        path = Path(value)
        return base / path if base is not None and not path.is_absolute() else path


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISFIFO: "a named pipe",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def _read_bytes(path: Path) -> bytes:
    """The contents of the regular file at ``path`` (symlinks followed), at most
    :data:`MAX_FILE_BYTES`. A named pipe or a device (``/dev/zero``) would block or never
    end: they are refused without reading; so is a file too large to be configuration."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise ConfigError(path, None, f"cannot read file: {_file_kind(mode)}")
        raw = file.read(MAX_FILE_BYTES + 1)
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(
            path, None, f"larger than {format_size(MAX_FILE_BYTES)}: not a configuration file"
        )
    return raw


def _read_toml(path: Path) -> dict[str, object]:
    try:
        raw = _read_bytes(path)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read file: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not valid UTF-8 (at byte {exc.start})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"invalid TOML: {exc}") from exc


def _parse_daemon(
    data: Mapping[str, object],
    *,
    file: Path,
    base: Path | None,
    host_memory: int,
    layout: Layout,
) -> DaemonConfig:
    top = _Table(file, data)
    for name in data:
        if name in _DAEMON_KEYS:
            top.fail(name, "unknown key; put it in the [daemon] table")
    top.check_known(("daemon",))
    section = data.get("daemon", {})
    if not isinstance(section, dict):
        top.fail("daemon", f"expected a table [daemon] (got {_describe(section)})")
    t = _Table(file, cast("dict[str, object]", section), "daemon.")
    t.check_known(_DAEMON_KEYS)
    memory_budget = t.size("memory_budget", "80%", host_memory)
    if memory_budget == 0:
        t.fail("memory_budget", 'must be greater than 0 (use "infinity" for no budget)')
    user = t.string("backend_user", "")
    return DaemonConfig(
        models_dir=t.path("models_dir", layout.models_dir, base),
        backends_dirs=t.paths("backends_dirs", layout.backends_dirs, base),
        runtime_dir=t.path("runtime_dir", layout.runtime_dir, base),
        max_loaded=t.integer("max_loaded", 0, 0, MAX_LOADED_MAX),
        memory_budget=memory_budget,
        idle_timeout=t.duration("idle_timeout", 0.0),
        busy_timeout=t.duration("busy_timeout", 0.0),
        force_eviction_when_busy=t.boolean("force_eviction_when_busy", False),
        eviction_retries=t.integer("eviction_retries", 30, 0),
        eviction_retry_interval=t.duration("eviction_retry_interval", 1.0),
        backend_user=user or None,
        load_stall_timeout=t.duration("load_stall_timeout", 120.0),
        stop_timeout=t.duration("stop_timeout", 10.0, positive=True),
        max_queue=t.integer("max_queue", 16, 0),
        request_timeout=t.duration("request_timeout", 300.0),
        backend_log_fields=t.boolean("backend_log_fields", True),
    )


def default_daemon_config(*, host_memory: int, layout: Layout | None = None) -> DaemonConfig:
    """The daemon configuration used when there is no daemon file (``layout``: the
    system's by default)."""
    layout = _with_fallback(layout or system_layout())
    return _parse_daemon(
        {}, file=layout.config_path, base=None, host_memory=host_memory, layout=layout
    )


def _with_fallback(layout: Layout) -> Layout:
    """``layout`` with the backends of its fallback daemon file after its own.

    The fallback's ``[daemon] backends_dirs`` if it sets them, else
    :data:`SYSTEM_BACKENDS_DIRS`; a fallback this user may not read counts as unset, one
    that is malformed is an error naming it.
    """
    file = layout.fallback_config
    if file is None:
        return layout
    dirs: tuple[Path, ...] = SYSTEM_BACKENDS_DIRS
    if os.access(file, os.R_OK):
        section = _read_toml(file).get("daemon", {})
        if isinstance(section, dict):
            table = _Table(file, cast("dict[str, object]", section), "daemon.")
            dirs = table.paths("backends_dirs", dirs, file.parent)
    own = tuple(d for d in layout.backends_dirs if d not in dirs)
    return replace(layout, backends_dirs=(*own, *dirs), fallback_config=None)


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model name, or ``None`` if it can.

    A model name is any UTF-8 text (spaces and non-ASCII allowed) that is not
    empty, does not start with ``.``, contains neither ``/`` nor control
    characters, and is at most 200 bytes long in UTF-8.
    """
    if not name:
        return "a model name must not be empty"
    if name.startswith("."):
        return "a model name must not start with '.'"
    if "/" in name:
        return "a model name must not contain '/'"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "a model name must be valid UTF-8"
    if any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in name):
        return "a model name must not contain control characters"
    if len(encoded) > MODEL_NAME_MAX_BYTES:
        return (
            f"a model name must be at most {MODEL_NAME_MAX_BYTES} bytes "
            f"(this one is {len(encoded)})"
        )
    return None


_KIND_NAMES: Final = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
}
_INT32_MIN: Final = -(2**31)
_INT32_MAX: Final = 2**31 - 1


def _option_scalar(
    t: _Table, name: str, kind: str, value: object, index: int | None = None
) -> object:
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        if kind == "int" and isinstance(value, int):
            if not _INT32_MIN <= value <= _INT32_MAX:
                t.fail(name, f"must be between {_INT32_MIN} and {_INT32_MAX} (got {value})", index)
            return value
        if kind == "float" and isinstance(value, int | float):
            return float(value)
    t.fail(name, f"expected {_KIND_NAMES[kind]} (got {_describe(value)})", index)


def _option_value(t: _Table, name: str, value: object) -> object:
    kind = MODEL_OPTIONS_TYPES[name]
    if not kind.endswith("[]"):
        return _option_scalar(t, name, kind, value)
    item_kind = kind.removesuffix("[]")
    if not isinstance(value, list):
        t.fail(
            name,
            f"expected an array of {_KIND_NAMES[item_kind].removeprefix('a ')}s "
            f"(got {_describe(value)})",
        )
    return tuple(_option_scalar(t, name, item_kind, item, i) for i, item in enumerate(value))


def _parse_options(file: Path, value: object, has_model: bool) -> Mapping[str, object]:
    if value is _MISSING:
        return MappingProxyType({})
    if not isinstance(value, dict):
        _Table(file, {}).fail("options", f"expected a table [options] (got {_describe(value)})")
    t = _Table(file, cast("dict[str, object]", value), "options.")
    options: dict[str, object] = {}
    for name, item in cast("dict[str, object]", value).items():
        if name not in MODEL_OPTIONS_FIELDS:
            close = difflib.get_close_matches(name, sorted(MODEL_OPTIONS_FIELDS), n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            t.fail(name, f"not a field of LocalAI's ModelOptions{hint}")
        if has_model and name in _MODEL_PATH_OPTIONS:
            t.fail(name, 'conflicts with the top-level "model" key; set only one of them')
        options[name] = _option_value(t, name, item)
    return MappingProxyType(options)


def _resolve_model_path(model: str, models_dir: Path) -> str:
    if not model or _URI_RE.match(model) or Path(model).is_absolute():
        return model
    return str(models_dir / model)


def _parse_model(
    name: str,
    data: Mapping[str, object],
    *,
    file: Path,
    daemon: DaemonConfig,
    host_memory: int,
) -> ModelConfig:
    t = _Table(file, data)
    t.check_known(_MODEL_KEYS)
    if t.get("backend") is _MISSING:
        t.fail("backend", "required key is missing (a backend name, alias or meta backend)")
    backend = t.string("backend", "")
    if not backend.strip():
        t.fail("backend", "must not be empty")

    model = t.string("model", "")

    memory_max = t.size("memory_max", "infinity", host_memory)
    if memory_max == 0:
        t.fail("memory_max", 'must be greater than 0 (use "infinity" for no limit)')
    memory_high: int | None
    if t.get("memory_high") is _MISSING:
        memory_high = None if memory_max == UINT64_MAX else memory_max * 9 // 10
    else:
        memory_high = t.size("memory_high", "infinity", host_memory)
        if UINT64_MAX not in (memory_max, memory_high) and memory_high > memory_max:
            t.fail(
                "memory_high",
                f"must not exceed memory_max ({format_size(memory_max)}), "
                f"got {format_size(memory_high)}",
            )
    gpu_memory = t.size("gpu_memory", "0", None)
    if gpu_memory == UINT64_MAX:
        t.fail("gpu_memory", 'must be a finite size (got "infinity")')

    groups_value = t.get("concurrency_groups")
    groups: list[str] = []
    if groups_value is not _MISSING:
        if not isinstance(groups_value, list):
            t.fail(
                "concurrency_groups",
                f"expected an array of strings (got {_describe(groups_value)})",
            )
        for i, group in enumerate(groups_value):
            if not isinstance(group, str) or not group:
                t.fail(
                    "concurrency_groups",
                    f"expected a non-empty string (got {_describe(group)})",
                    i,
                )
            if "\0" in group:
                t.fail("concurrency_groups", "must not contain NUL characters", i)
            if group not in groups:
                groups.append(group)

    restart = t.string("restart", "no")
    if restart not in ("no", "on-failure"):
        t.fail("restart", f'expected "no" or "on-failure" (got {_describe(restart)})')

    user = t.string("user", "")
    return ModelConfig(
        name=name,
        backend=backend,
        model=_resolve_model_path(model, file.parent),
        memory_max=memory_max,
        memory_high=memory_high,
        gpu_memory=gpu_memory,
        concurrency_groups=tuple(groups),
        pinned=t.boolean("pinned", False),
        preload=t.boolean("preload", False),
        idle_timeout=t.duration("idle_timeout", daemon.idle_timeout),
        busy_timeout=t.duration("busy_timeout", daemon.busy_timeout),
        parallel=t.integer("parallel", 1, 1),
        max_queue=t.integer("max_queue", daemon.max_queue, 0),
        restart=cast("RestartPolicy", restart),
        user=user or None,
        tasks_max=t.integer("tasks_max", 4096, 1, TASKS_MAX_MAX),
        cpu_weight=(
            None if t.get("cpu_weight") is _MISSING else t.integer("cpu_weight", 100, 1, 10000)
        ),
        options=_parse_options(file, t.get("options"), bool(model)),
        source=file,
    )


def load_model_config(path: Path, daemon: DaemonConfig, *, host_memory: int) -> ModelConfig:
    """Load one model file.  The model name is the file name minus ``.toml``.

    A relative ``model`` path is resolved against the file's directory (the
    models_dir); absolute paths and URIs (``scheme://...``) are kept as
    written.  To pass a value that is not a path (such as a Hugging Face
    repository id), leave ``model`` unset and use ``options.Model``.

    Raises:
        ConfigError: on any problem with the name or the contents.
    """
    name = path.name.removesuffix(".toml")
    problem = model_name_problem(name)
    if problem is not None:
        raise ConfigError(path, None, f"bad model file name: {problem}")
    data = _read_toml(path)
    return _parse_model(name, data, file=path, daemon=daemon, host_memory=host_memory)


def _model_files(models_dir: Path) -> list[Path]:
    try:
        names = os.listdir(models_dir)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(
            models_dir, None, f"cannot list models directory: {exc.strerror or exc}"
        ) from exc
    return sorted(
        models_dir / name for name in names if name.endswith(".toml") and not name.startswith(".")
    )


def load_config(path: Path | None, *, host_memory: int, layout: Layout | None = None) -> Config:
    """Load the daemon file and every model file.

    ``layout`` gives the defaults (the system's, :func:`system_layout`, when None).
    ``path=None`` reads its ``config_path`` (:data:`DEFAULT_CONFIG_PATH` for the system)
    if it exists and uses the defaults otherwise; an explicit ``path`` must exist.  Then every
    ``*.toml`` file in ``models_dir`` that is not hidden is a model (a missing
    models_dir means no models).  ``host_memory`` is the host's RAM in bytes,
    used to resolve ``%`` sizes.

    Raises:
        ConfigError: for the first problem found (files are read in name order).
        ValueError: if ``host_memory`` is not positive.
    """
    if host_memory <= 0:
        raise ValueError(f"host_memory must be positive (got {host_memory})")
    layout = layout or system_layout()
    source: Path | None = path
    if path is None and layout.config_path.exists():
        source = layout.config_path
    if source is None:
        daemon = default_daemon_config(host_memory=host_memory, layout=layout)
    else:
        data = _read_toml(source)
        daemon = _parse_daemon(
            data,
            file=source,
            base=source.parent,
            host_memory=host_memory,
            layout=_with_fallback(layout),
        )
    models = {
        model.name: model
        for model in (
            load_model_config(file, daemon, host_memory=host_memory)
            for file in _model_files(daemon.models_dir)
        )
    }
    return Config(
        daemon=daemon,
        models=MappingProxyType(dict(sorted(models.items()))),
        source=source,
    )
