"""Fuzzing the configuration loader with hostile input (issue 8, item 3).

Whatever the files hold (malformed TOML, values of every type, huge and negative numbers,
unknown keys, odd file names, symlinks, pipes, devices, thousands of files), ``load_config``
either returns a configuration that modeld can use to the end (every value fits the D-Bus
types it is sent as, to systemd and to clients) or raises :class:`ConfigError`, naming the
file; never another exception, never a hang. ``MODELD_FUZZ_EXAMPLES`` raises the number of
generated examples (CI runs the default, a few seconds).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from dbus_next import Message, Variant
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modeld import config as config_module
from modeld.config import (
    MAX_FILE_BYTES,
    Config,
    ConfigError,
    ModelConfig,
    load_config,
)
from modeld.naming import scope_name
from modeld.system.systemd import ScopeSpec, scope_properties
from modeld.units import DURATION_MAX, UINT64_MAX

HOST = 16 * 1024**3
EXAMPLES = int(os.environ.get("MODELD_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 150,
    deadline=None,
    derandomize=not EXAMPLES,  # CI: the same examples each run; on demand: new ones
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DAEMON_KEYS = list(config_module._DAEMON_KEYS)
MODEL_KEYS = list(config_module._MODEL_KEYS)
OPTION_KEYS = ("ContextSize", "Options", "Threads", "MMap", "NGPULayers", "Model", "Bogus")

NASTY_STRINGS = (
    "",
    " ",
    "infinity",
    "-infinity",
    "80%",
    "150%",
    "-1",
    "0",
    "-5s",
    "1h30m",
    "512M",
    "1E",
    "99999999999999999999E",
    "9" * 400,
    "9" * 40 + "w",
    "1e400",
    "nan",
    "reference",
    "../../etc/passwd",
    "/dev/zero",
    "root",
    "nobody",
    "a\0b",
    "\x1b[31m",
    "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    "é" * 100,
)


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.integers(min_value=2**63, max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(NASTY_STRINGS),
        st.text(max_size=30),
    )


def values() -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.dictionaries(st.sampled_from(OPTION_KEYS) | st.text(max_size=8), inner, max_size=3),
        ),
        max_leaves=6,
    )


def tables(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Tables of known and unknown keys holding anything."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=12), values(), max_size=6)


wide_ints = st.integers(min_value=-(2**70), max_value=2**70)
strings = (
    st.sampled_from(NASTY_STRINGS)
    | st.text(max_size=20)
    | st.text(max_size=5).map(lambda t: f"{t}\0{t}")  # NUL: D-Bus cannot carry it
)
sizes = wide_ints | st.sampled_from(NASTY_STRINGS) | st.from_regex(r"[0-9]{1,25}[KMGTPE%]?")
durations = (
    wide_ints
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(NASTY_STRINGS)
    | st.from_regex(r"[0-9]{1,30}(ms|s|m|h|d|w)?")
)
DAEMON_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "max_loaded": wide_ints,
    "memory_budget": sizes,
    "idle_timeout": durations,
    "busy_timeout": durations,
    "force_eviction_when_busy": st.booleans(),
    "eviction_retries": wide_ints,
    "eviction_retry_interval": durations,
    "backend_user": strings,
    "load_stall_timeout": durations,
    "stop_timeout": durations,
    "max_queue": wide_ints,
    "request_timeout": durations,
    "backend_log_fields": st.booleans(),
}
MODEL_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "model": strings,
    "memory_max": sizes,
    "memory_high": sizes,
    "gpu_memory": sizes,
    "concurrency_groups": st.lists(strings, max_size=3),
    "pinned": st.booleans(),
    "preload": st.booleans(),
    "idle_timeout": durations,
    "busy_timeout": durations,
    "parallel": wide_ints,
    "max_queue": wide_ints,
    "restart": st.sampled_from(["no", "on-failure"]) | strings,
    "user": strings,
    "tasks_max": wide_ints,
    "cpu_weight": wide_ints,
    "options": st.dictionaries(st.sampled_from(OPTION_KEYS), values(), max_size=3),
}


def plausible(known: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Tables of known keys only, each with a value of about the right type, often hostile:
    the invalid ones rarely stop the loader before the hostile ones reach it."""
    return st.fixed_dictionaries({}, optional=known)


model_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0/"),
    min_size=1,
    max_size=60,
)


def dump(data: dict[str, Any]) -> bytes:
    """TOML of ``data``; what tomli_w cannot write (a huge int) becomes hand-made TOML."""
    try:
        return tomli_w.dumps(data).encode()
    except (TypeError, ValueError, OverflowError):
        lines = []
        for key, value in data.items():
            if isinstance(value, int) and not isinstance(value, bool):
                lines.append(f"{tomli_w.dumps({key: 0}).split(' = ')[0]} = {value}")
        return "\n".join(lines).encode()


def bus_strings(value: Any) -> None:
    """D-Bus strings are UTF-8 without NUL: dbus-daemon drops a connection that sends
    anything else (dbus-next does not check)."""
    if isinstance(value, str):
        assert "\0" not in value, f"NUL in {value!r}"
        value.encode("utf-8")
    elif isinstance(value, Variant):
        bus_strings(value.value)
    elif isinstance(value, list | tuple):
        for item in value:
            bus_strings(item)


def marshals(signature: str, body: list[Any]) -> None:
    """Raise if ``body`` cannot be sent as ``signature`` (what dbus-next would do later)."""
    bus_strings(body)
    Message(
        destination="org.freedesktop.systemd1",
        path="/org/freedesktop/systemd1",
        interface="org.freedesktop.systemd1.Manager",
        member="Test",
        signature=signature,
        body=body,
    )._marshall(negotiate_unix_fd=False)


def usable(config: Config) -> None:
    """Every accepted configuration can be used: its values fit where modeld sends them."""
    daemon = config.daemon
    marshals("u", [daemon.max_loaded])
    marshals("t", [daemon.memory_budget])
    for seconds in (
        daemon.idle_timeout,
        daemon.busy_timeout,
        daemon.eviction_retry_interval,
        daemon.load_stall_timeout,
        daemon.stop_timeout,
        daemon.request_timeout,
    ):
        assert 0 <= seconds <= DURATION_MAX
    for model in config.models.values():
        check_model(model, daemon.memory_budget, daemon.stop_timeout)


def check_model(model: ModelConfig, budget: int, stop_timeout: float) -> None:
    spec = ScopeSpec(
        unit=scope_name(model.name, 1),
        description=f"modeld backend for model {model.name} ({model.backend})",
        slice="modeld.slice",
        memory_max=model.memory_max if model.memory_max != UINT64_MAX else budget,
        memory_high=model.memory_high,
        tasks_max=model.tasks_max,
        cpu_weight=model.cpu_weight,
        stop_timeout_s=stop_timeout,
    )
    marshals("ssa(sv)a(sa(sv))", [spec.unit, "fail", scope_properties(spec, 1), []])
    marshals(
        "sssstuu",
        [model.name, model.backend, model.model, model.user or "", model.gpu_memory, 0, 0],
    )
    marshals("as", [list(model.concurrency_groups)])
    for seconds in (model.idle_timeout, model.busy_timeout):
        assert 0 <= seconds <= DURATION_MAX


def load(root: Path) -> Config | None:
    """load_config on ``root/modeld.toml``: a Config, or None after a proper ConfigError."""
    try:
        config = load_config(root / "modeld.toml", host_memory=HOST)
    except ConfigError as err:
        assert str(err).startswith(str(root)), err
        assert "\n" not in str(err)
        return None
    usable(config)
    return config


class Tree:
    """A daemon file and a models directory under a fresh directory per example."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.count = 0

    def fresh(self, daemon: bytes | None = None) -> Path:
        self.count += 1
        root = self.base / str(self.count)
        (root / "models.d").mkdir(parents=True)
        models_dir = tomli_w.dumps({"models_dir": str(root / "models.d")})
        (root / "modeld.toml").write_bytes(
            daemon if daemon is not None else f"[daemon]\n{models_dir}".encode()
        )
        return root


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


@FUZZ
@given(daemon=plausible(DAEMON_VALUES) | tables(DAEMON_KEYS))
def test_any_daemon_table_is_loaded_or_refused(tree: Tree, daemon: dict[str, Any]) -> None:
    root = tree.fresh()
    daemon = {**daemon, "models_dir": str(root / "models.d")}
    (root / "modeld.toml").write_bytes(b"[daemon]\n" + dump(daemon))
    load(root)


@FUZZ
@given(models=st.dictionaries(model_names, tables(MODEL_KEYS), min_size=1, max_size=3))
def test_any_model_files_are_loaded_or_refused(
    tree: Tree, models: dict[str, dict[str, Any]]
) -> None:
    root = tree.fresh()
    for name, table in models.items():
        try:
            (root / "models.d" / f"{name}.toml").write_bytes(dump(table))
        except OSError:  # a name the file system refuses (too long)
            assume(False)
    config = load(root)
    if config is not None:
        assert set(config.models) <= {n for n in models if not n.startswith(".")}


@FUZZ
@given(table=st.just({}) | plausible(MODEL_VALUES), backend=strings)
def test_huge_and_negative_values_in_a_model(
    tree: Tree, table: dict[str, Any], backend: str
) -> None:
    root = tree.fresh()
    (root / "models.d" / "m.toml").write_bytes(dump({"backend": backend, **table}))
    load(root)


@FUZZ
@given(content=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_are_loaded_or_refused(tree: Tree, content: bytes) -> None:
    root = tree.fresh()
    (root / "models.d" / "raw.toml").write_bytes(content)
    load(root)
    (root / "modeld.toml").write_bytes(content)
    load(root)


# --- the file system ---------------------------------------------------------------------


def refused(root: Path, needle: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(root / "modeld.toml", host_memory=HOST)
    assert needle in str(info.value), info.value
    return str(info.value)


def test_a_symlinked_model_file_is_read_through_its_link(tree: Tree) -> None:
    root = tree.fresh()
    (root / "real.txt").write_text('backend = "reference"\n')
    (root / "models.d" / "linked.toml").symlink_to(root / "real.txt")
    config = load(root)
    assert config is not None and config.models["linked"].backend == "reference"


def test_dangling_and_looping_symlinks_are_refused(tree: Tree) -> None:
    root = tree.fresh()
    (root / "models.d" / "dangling.toml").symlink_to(root / "nowhere")
    refused(root, "dangling.toml: cannot read file: No such file or directory")
    (root / "models.d" / "dangling.toml").unlink()
    (root / "models.d" / "loop.toml").symlink_to(root / "models.d" / "loop.toml")
    refused(root, "loop.toml: cannot read file: Too many levels of symbolic links")


def test_a_named_pipe_is_refused_without_blocking(tree: Tree) -> None:
    """Reading a FIFO nobody writes to would block modeld's reload forever."""
    root = tree.fresh()
    os.mkfifo(root / "models.d" / "pipe.toml")
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load_config(root / "modeld.toml", host_memory=HOST)
            outcome.append(None)
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock it for the next tests
        with open(root / "models.d" / "pipe.toml", "wb"):
            pass
    assert outcome and isinstance(outcome[0], ConfigError), outcome
    assert "pipe.toml: cannot read file: a named pipe" in str(outcome[0])


def test_devices_and_endless_files_are_refused(tree: Tree) -> None:
    """``/dev/zero`` never ends: reading it whole would eat all memory."""
    root = tree.fresh()
    (root / "models.d" / "zero.toml").symlink_to("/dev/zero")
    refused(root, "zero.toml: cannot read file: a character device")
    (root / "models.d" / "zero.toml").unlink()
    (root / "models.d" / "huge.toml").write_bytes(b"# " + b"x" * MAX_FILE_BYTES + b"\n")
    refused(root, "huge.toml: larger than 1.0 MiB: not a configuration file")
    (root / "modeld.toml").unlink()
    (root / "modeld.toml").symlink_to("/dev/zero")
    refused(root, "modeld.toml: cannot read file: a character device")


def test_an_unreadable_file_is_refused(tree: Tree) -> None:
    """Root reads past file modes; /proc/self/mem fails with EIO for anyone at offset 0."""
    root = tree.fresh()
    (root / "models.d" / "mem.toml").symlink_to("/proc/self/mem")
    refused(root, "mem.toml: cannot read file: Input/output error")
    if os.geteuid() != 0:
        (root / "models.d" / "mem.toml").unlink()
        secret = root / "models.d" / "secret.toml"
        secret.write_text('backend = "reference"\n')
        secret.chmod(0)
        refused(root, "secret.toml: cannot read file: Permission denied")


def test_thousands_of_model_files_load_in_bounded_time(tree: Tree) -> None:
    root = tree.fresh()
    models = root / "models.d"
    for i in range(3000):
        (models / f"model-{i:04d}.toml").write_text(
            f'backend = "reference"\nmemory_max = "{i + 1}M"\n[options]\nContextSize = {i}\n'
        )
    started = time.monotonic()
    config = load(root)
    elapsed = time.monotonic() - started
    assert config is not None and len(config.models) == 3000
    assert config.models["model-2999"].memory_max == 3000 * 1024**2
    assert elapsed < 30, f"3000 model files took {elapsed:.1f}s"
    (models / "model-1500.toml").write_text("backend = [\n")
    refused(root, "model-1500.toml: invalid TOML")
