"""Tests for modeld.config: the daemon file, model files and their errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modeld import config as config_module
from modeld.config import (
    DEFAULT_CONFIG_PATH,
    MODEL_OPTIONS_FIELDS,
    MODEL_OPTIONS_TYPES,
    Config,
    ConfigError,
    DaemonConfig,
    default_daemon_config,
    load_config,
    load_model_config,
    model_name_problem,
)
from modeld.units import UINT64_MAX

MiB = 1024**2
GiB = 1024**3
HOST = 16 * GiB


class Setup:
    """A daemon file in a temporary directory, pointing at a models_dir next to it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemon_file = root / "modeld.toml"
        self.models_dir = root / "models.d"
        self.models_dir.mkdir()
        self.daemon("")

    def daemon(self, body: str) -> Path:
        self.daemon_file.write_text(
            f'[daemon]\nmodels_dir = "{self.models_dir}"\n{body}', encoding="utf-8"
        )
        return self.daemon_file

    def model(self, name: str, body: str) -> Path:
        path = self.models_dir / f"{name}.toml"
        path.write_text(body, encoding="utf-8")
        return path

    def load(self) -> Config:
        return load_config(self.daemon_file, host_memory=HOST)

    def error(self) -> ConfigError:
        with pytest.raises(ConfigError) as info:
            self.load()
        return info.value


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def daemon_defaults() -> DaemonConfig:
    return default_daemon_config(host_memory=HOST)


# --- daemon file --------------------------------------------------------------------------


def test_defaults() -> None:
    d = daemon_defaults()
    assert d.models_dir == Path("/etc/modeld/models.d")
    assert d.backends_dirs == (Path("/var/lib/modeld/backends"), Path("/usr/lib/modeld/backends"))
    assert d.runtime_dir == Path("/run/modeld")
    assert d.max_loaded == 0
    assert d.memory_budget == HOST * 80 // 100
    assert d.idle_timeout == 0.0
    assert d.busy_timeout == 0.0
    assert d.force_eviction_when_busy is False
    assert d.eviction_retries == 30
    assert d.eviction_retry_interval == 1.0
    assert d.backend_user is None
    assert d.load_stall_timeout == 120.0
    assert d.stop_timeout == 10.0
    assert d.request_timeout == 300.0


def test_default_path_constant() -> None:
    assert Path("/etc/modeld/modeld.toml") == DEFAULT_CONFIG_PATH


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    cfg = load_config(None, host_memory=HOST)
    assert cfg.source is None
    assert cfg.daemon == daemon_defaults()


def test_existing_default_file_is_read(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    setup.daemon("max_loaded = 3\n")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", setup.daemon_file)
    cfg = load_config(None, host_memory=HOST)
    assert cfg.source == setup.daemon_file
    assert cfg.daemon.max_loaded == 3


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, host_memory=HOST)
    assert info.value.file == str(path)
    assert info.value.key is None
    assert str(info.value) == f"{path}: cannot read file: No such file or directory"


def test_empty_daemon_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "modeld.toml"
    path.write_text("")
    cfg = load_config(path, host_memory=HOST)
    assert cfg.source == path
    assert cfg.daemon.max_loaded == 0
    assert cfg.daemon.models_dir == Path("/etc/modeld/models.d")


def test_full_daemon_file(setup: Setup) -> None:
    setup.daemon(
        """
backends_dirs = ["/opt/backends", "relative/backends"]
runtime_dir = "/run/other"
max_loaded = 2
memory_budget = "8G"
idle_timeout = "15m"
busy_timeout = 30
force_eviction_when_busy = true
eviction_retries = 5
eviction_retry_interval = "250ms"
backend_user = "nobody"
load_stall_timeout = "2m"
stop_timeout = 3.5
request_timeout = "90s"
"""
    )
    d = setup.load().daemon
    assert d.models_dir == setup.models_dir
    assert d.backends_dirs == (Path("/opt/backends"), setup.root / "relative/backends")
    assert d.runtime_dir == Path("/run/other")
    assert d.max_loaded == 2
    assert d.memory_budget == 8 * GiB
    assert d.idle_timeout == 900.0
    assert d.busy_timeout == 30.0
    assert d.force_eviction_when_busy is True
    assert d.eviction_retries == 5
    assert d.eviction_retry_interval == 0.25
    assert d.backend_user == "nobody"
    assert d.load_stall_timeout == 120.0
    assert d.stop_timeout == 3.5
    assert d.request_timeout == 90.0


def test_relative_models_dir_is_relative_to_the_daemon_file(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "m.toml").write_text('backend = "b"\n')
    path = tmp_path / "modeld.toml"
    path.write_text('[daemon]\nmodels_dir = "models"\n')
    cfg = load_config(path, host_memory=HOST)
    assert cfg.daemon.models_dir == tmp_path / "models"
    assert list(cfg.models) == ["m"]


def test_memory_budget_percent_and_infinity(setup: Setup) -> None:
    setup.daemon('memory_budget = "50%"\n')
    assert setup.load().daemon.memory_budget == HOST // 2
    setup.daemon('memory_budget = "infinity"\n')
    assert setup.load().daemon.memory_budget == UINT64_MAX
    setup.daemon("memory_budget = 1073741824\n")
    assert setup.load().daemon.memory_budget == GiB


def test_empty_backend_user_means_default(setup: Setup) -> None:
    setup.daemon('backend_user = ""\n')
    assert setup.load().daemon.backend_user is None


def test_daemon_objects_are_frozen() -> None:
    d = daemon_defaults()
    with pytest.raises(AttributeError):
        d.max_loaded = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        (
            'max_loaded = "3"',
            "daemon.max_loaded",
            'expected an integer (got string "3")',
        ),
        ("max_loaded = -1", "daemon.max_loaded", "must be between 0 and 4294967295 (got -1)"),
        (
            "max_loaded = 4294967296",
            "daemon.max_loaded",
            "must be between 0 and 4294967295 (got 4294967296)",
        ),
        ('backend_user = "a\\u0000"', "daemon.backend_user", "must not contain NUL characters"),
        (
            'stop_timeout = "' + "9" * 400 + '"',
            "daemon.stop_timeout",
            'duration is too large (got "' + "9" * 59 + '…")',
        ),
        ("stop_timeout = 1e300", "daemon.stop_timeout", "duration is too large (got 1e+300)"),
        ("max_loaded = true", "daemon.max_loaded", "expected an integer (got boolean true)"),
        (
            'memory_budget = "lots"',
            "daemon.memory_budget",
            'expected a size like 512M, 2G or 80% (got "lots")',
        ),
        (
            "memory_budget = 1.5",
            "daemon.memory_budget",
            "expected a size like 512M, 2G or 80% (got float 1.5)",
        ),
        (
            'memory_budget = "0"',
            "daemon.memory_budget",
            'must be greater than 0 (use "infinity" for no budget)',
        ),
        (
            'memory_budget = "120%"',
            "daemon.memory_budget",
            'a percentage must be at most 100% (got "120%")',
        ),
        (
            'idle_timeout = "soon"',
            "daemon.idle_timeout",
            'expected a duration like 90, 500ms, 15m or 1h30m (got "soon")',
        ),
        (
            "busy_timeout = -1",
            "daemon.busy_timeout",
            "a duration must not be negative (got -1)",
        ),
        (
            "eviction_retry_interval = true",
            "daemon.eviction_retry_interval",
            "expected a duration like 90, 500ms, 15m or 1h30m (got boolean true)",
        ),
        ("stop_timeout = 0", "daemon.stop_timeout", "must be greater than 0 (got integer 0)"),
        (
            'force_eviction_when_busy = "yes"',
            "daemon.force_eviction_when_busy",
            'expected true or false (got string "yes")',
        ),
        ("eviction_retries = -2", "daemon.eviction_retries", "must be at least 0 (got -2)"),
        ("backend_user = 0", "daemon.backend_user", "expected a string (got integer 0)"),
        (
            'backends_dirs = "/opt/b"',
            "daemon.backends_dirs",
            'expected an array of paths (got string "/opt/b")',
        ),
        (
            'backends_dirs = ["/opt/b", 3]',
            "daemon.backends_dirs[1]",
            "expected a path (got integer 3)",
        ),
        ('runtime_dir = ""', "daemon.runtime_dir", "expected a non-empty path"),
        (
            "load_stall_timeout = 2024-01-01",
            "daemon.load_stall_timeout",
            "expected a duration like 90, 500ms, 15m or 1h30m (got a date/time)",
        ),
    ],
)
def test_daemon_value_errors(setup: Setup, body: str, key: str, problem: str) -> None:
    setup.daemon(body + "\n")
    err = setup.error()
    assert err.file == str(setup.daemon_file)
    assert err.key == key
    assert err.problem == problem
    assert str(err) == f"{setup.daemon_file}: {key}: {problem}"


def test_unknown_daemon_key(setup: Setup) -> None:
    setup.daemon("max_lodaed = 3\n")
    err = setup.error()
    assert err.key == "daemon.max_lodaed"
    assert err.problem.startswith('unknown key (did you mean "max_loaded"?); known keys: ')
    assert "models_dir" in err.problem
    assert "stop_timeout" in err.problem
    assert str(err).startswith(f"{setup.daemon_file}: daemon.max_lodaed: unknown key")


def test_unknown_daemon_key_without_suggestion(setup: Setup) -> None:
    setup.daemon("zzz = 3\n")
    err = setup.error()
    assert err.key == "daemon.zzz"
    assert err.problem.startswith("unknown key; known keys: models_dir, backends_dirs,")


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "modeld.toml"
    path.write_text("[deamon]\nmax_loaded = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, host_memory=HOST)
    assert str(info.value) == (
        f'{path}: deamon: unknown key (did you mean "daemon"?); known keys: daemon'
    )


def test_daemon_key_outside_daemon_table(tmp_path: Path) -> None:
    path = tmp_path / "modeld.toml"
    path.write_text("max_loaded = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, host_memory=HOST)
    assert str(info.value) == f"{path}: max_loaded: unknown key; put it in the [daemon] table"


def test_daemon_must_be_a_table(tmp_path: Path) -> None:
    path = tmp_path / "modeld.toml"
    path.write_text("daemon = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, host_memory=HOST)
    assert str(info.value) == f"{path}: daemon: expected a table [daemon] (got integer 1)"


def test_daemon_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "modeld.toml"
    path.write_text("[daemon]\nmax_loaded = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path, host_memory=HOST)
    err = info.value
    assert err.file == str(path)
    assert err.key is None
    assert err.problem.startswith("invalid TOML: ")
    assert "line 2" in err.problem
    assert "\n" not in str(err)


def test_daemon_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "modeld.toml"
    path.write_bytes(b"[daemon]\n# \xff\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, host_memory=HOST)
    assert str(info.value) == f"{path}: not valid UTF-8 (at byte 11)"


def test_daemon_file_with_bom(setup: Setup) -> None:
    setup.daemon_file.write_text(f'\ufeff[daemon]\nmodels_dir = "{setup.models_dir}"\n')
    assert setup.load().daemon.models_dir == setup.models_dir


def test_daemon_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, host_memory=HOST)
    assert str(info.value) == f"{tmp_path}: cannot read file: Is a directory"


def test_host_memory_must_be_positive(setup: Setup) -> None:
    with pytest.raises(ValueError):
        load_config(setup.daemon_file, host_memory=0)


# --- model files --------------------------------------------------------------------------


def test_minimal_model(setup: Setup) -> None:
    source = setup.model("demo", 'backend = "reference"\n')
    m = setup.load().models["demo"]
    assert m.name == "demo"
    assert m.backend == "reference"
    assert m.model == ""
    assert m.memory_max == UINT64_MAX
    assert m.memory_high is None
    assert m.gpu_memory == 0
    assert m.concurrency_groups == ()
    assert m.pinned is False
    assert m.preload is False
    assert m.idle_timeout == 0.0
    assert m.busy_timeout == 0.0
    assert m.parallel == 1
    assert m.max_queue == 16  # the daemon's default
    assert m.restart == "no"
    assert m.user is None
    assert m.tasks_max == 4096
    assert m.cpu_weight is None  # not set: systemd's default, no CPU controller
    assert dict(m.options) == {}
    assert m.source == source


def test_full_model(setup: Setup) -> None:
    setup.model(
        "big",
        """
backend = "llama-cpp"
model = "/usr/share/modeld/models/demo.txt"
memory_max = "512M"
memory_high = "400M"
gpu_memory = "2G"
concurrency_groups = ["big", "gpu"]
pinned = true
preload = true
idle_timeout = "10m"
busy_timeout = "5m"
parallel = 4
max_queue = 0
restart = "on-failure"
user = "modeld"
tasks_max = 128
cpu_weight = 500

[options]
ContextSize = 2048
Options = ["load_delay=2", "x=y"]
F16Memory = true
RopeFreqBase = 10000
LoraScales = [0.5, 1]
""",
    )
    m = setup.load().models["big"]
    assert m.backend == "llama-cpp"
    assert m.model == "/usr/share/modeld/models/demo.txt"
    assert m.memory_max == 512 * MiB
    assert m.memory_high == 400 * MiB
    assert m.gpu_memory == 2 * GiB
    assert m.concurrency_groups == ("big", "gpu")
    assert m.pinned is True
    assert m.preload is True
    assert m.idle_timeout == 600.0
    assert m.busy_timeout == 300.0
    assert m.parallel == 4
    assert m.max_queue == 0
    assert m.restart == "on-failure"
    assert m.user == "modeld"
    assert m.tasks_max == 128
    assert m.cpu_weight == 500
    assert dict(m.options) == {
        "ContextSize": 2048,
        "Options": ("load_delay=2", "x=y"),
        "F16Memory": True,
        "RopeFreqBase": 10000.0,
        "LoraScales": (0.5, 1.0),
    }
    assert isinstance(m.options["RopeFreqBase"], float)


def test_options_are_read_only(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\n[options]\nContextSize = 1\n')
    m = setup.load().models["m"]
    with pytest.raises(TypeError):
        m.options["ContextSize"] = 2  # type: ignore[index]


def test_models_mapping_is_sorted_and_read_only(setup: Setup) -> None:
    for name in ["zeta", "alpha", "Mid", "émile"]:
        setup.model(name, 'backend = "b"\n')
    cfg = setup.load()
    assert list(cfg.models) == sorted(["zeta", "alpha", "Mid", "émile"])
    with pytest.raises(TypeError):
        cfg.models["x"] = cfg.models["zeta"]  # type: ignore[index]


def test_model_timeouts_default_to_the_daemons(setup: Setup) -> None:
    setup.daemon('idle_timeout = "15m"\nbusy_timeout = "1m"\n')
    setup.model("m", 'backend = "b"\n')
    setup.model("n", 'backend = "b"\nidle_timeout = 0\n')
    cfg = setup.load()
    assert cfg.models["m"].idle_timeout == 900.0
    assert cfg.models["m"].busy_timeout == 60.0
    assert cfg.models["n"].idle_timeout == 0.0


def test_model_max_queue_defaults_to_the_daemons(setup: Setup) -> None:
    setup.daemon("max_queue = 3\n")
    setup.model("m", 'backend = "b"\n')
    setup.model("n", 'backend = "b"\nmax_queue = 40\n')
    cfg = setup.load()
    assert cfg.daemon.max_queue == 3
    assert cfg.models["m"].max_queue == 3
    assert cfg.models["n"].max_queue == 40


def test_memory_high_defaults_to_90_percent(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\nmemory_max = "1000"\n')
    setup.model("n", 'backend = "b"\nmemory_max = "512M"\n')
    cfg = setup.load()
    assert cfg.models["m"].memory_high == 900
    assert cfg.models["n"].memory_high == 512 * MiB * 9 // 10


def test_memory_high_without_limit(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\nmemory_max = "infinity"\n')
    setup.model("n", 'backend = "b"\nmemory_high = "1G"\n')
    setup.model("o", 'backend = "b"\nmemory_max = "1G"\nmemory_high = "infinity"\n')
    cfg = setup.load()
    assert cfg.models["m"].memory_high is None
    assert cfg.models["n"].memory_high == GiB
    assert cfg.models["o"].memory_high == UINT64_MAX


def test_percent_sizes_use_host_memory(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\nmemory_max = "25%"\nmemory_high = "20%"\n')
    m = setup.load().models["m"]
    assert m.memory_max == HOST // 4
    assert m.memory_high == HOST // 5


def test_relative_model_path_is_resolved_against_models_dir(setup: Setup) -> None:
    setup.model("rel", 'backend = "b"\nmodel = "weights/demo.gguf"\n')
    setup.model("abs", 'backend = "b"\nmodel = "/srv/demo.gguf"\n')
    setup.model("uri", 'backend = "b"\nmodel = "https://example.com/demo.gguf"\n')
    cfg = setup.load()
    assert cfg.models["rel"].model == str(setup.models_dir / "weights/demo.gguf")
    assert cfg.models["abs"].model == "/srv/demo.gguf"
    assert cfg.models["uri"].model == "https://example.com/demo.gguf"


def test_options_model_is_passed_through_when_model_unset(setup: Setup) -> None:
    setup.model("hf", 'backend = "vllm"\n[options]\nModel = "Qwen/Qwen2-0.5B"\n')
    m = setup.load().models["hf"]
    assert m.model == ""
    assert m.options["Model"] == "Qwen/Qwen2-0.5B"


def test_concurrency_groups_are_deduplicated(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\nconcurrency_groups = ["a", "b", "a"]\n')
    assert setup.load().models["m"].concurrency_groups == ("a", "b")


def test_empty_user_means_default(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\nuser = ""\n')
    assert setup.load().models["m"].user is None


@pytest.mark.parametrize(
    "name",
    ["demo", "with space", "Ünïcödé", "模型", "emoji 🦙", "a.b.c", "x" * 195, "trailing "],
)
def test_model_names_accepted(setup: Setup, name: str) -> None:
    setup.model(name, 'backend = "b"\n')
    cfg = setup.load()
    assert list(cfg.models) == [name]
    assert cfg.models[name].name == name


def test_hidden_and_non_toml_files_are_ignored(setup: Setup) -> None:
    setup.model("real", 'backend = "b"\n')
    (setup.models_dir / ".hidden.toml").write_text("garbage = [")
    (setup.models_dir / "notes.txt").write_text("garbage = [")
    (setup.models_dir / "real.toml~").write_text("garbage = [")
    (setup.models_dir / "real.toml.bak").write_text("garbage = [")
    assert list(setup.load().models) == ["real"]


def test_missing_models_dir_means_no_models(setup: Setup) -> None:
    setup.models_dir.rmdir()
    assert dict(setup.load().models) == {}


def test_models_dir_is_a_file(setup: Setup) -> None:
    setup.models_dir.rmdir()
    setup.models_dir.write_text("")
    err = setup.error()
    assert err.file == str(setup.models_dir)
    assert "cannot list models directory: Not a directory" in str(err)


def test_model_file_that_is_a_directory(setup: Setup) -> None:
    (setup.models_dir / "dir.toml").mkdir()
    err = setup.error()
    assert str(err) == f"{setup.models_dir / 'dir.toml'}: cannot read file: Is a directory"


@pytest.mark.parametrize(
    ("filename", "problem"),
    [
        ("bad\nname.toml", "a model name must not contain control characters"),
        ("tab\there.toml", "a model name must not contain control characters"),
        ("esc\x1b.toml", "a model name must not contain control characters"),
        ("c1\x85.toml", "a model name must not contain control characters"),
        ("y" * 201 + ".toml", "a model name must be at most 200 bytes (this one is 201)"),
        ("é" * 101 + ".toml", "a model name must be at most 200 bytes (this one is 202)"),
    ],
)
def test_bad_model_names_rejected(setup: Setup, filename: str, problem: str) -> None:
    path = setup.models_dir / filename
    path.write_text('backend = "b"\n')
    err = setup.error()
    assert err.file == str(path)
    assert err.key is None
    assert err.problem == f"bad model file name: {problem}"
    assert "\n" not in str(err)
    assert "\t" not in str(err)


def test_non_utf8_model_name_rejected(setup: Setup) -> None:
    path = os.path.join(os.fsencode(setup.models_dir), b"bad\xff.toml")
    with open(path, "w") as f:
        f.write('backend = "b"\n')
    err = setup.error()
    assert err.problem == "bad model file name: a model name must be valid UTF-8"
    str(err).encode("utf-8")


def test_bare_dot_toml_is_hidden_and_ignored(setup: Setup) -> None:
    (setup.models_dir / ".toml").write_text('backend = "b"\n')
    assert dict(setup.load().models) == {}


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "a model name must not be empty"),
        (".hidden", "a model name must not start with '.'"),
        ("a/b", "a model name must not contain '/'"),
        ("a\x00b", "a model name must not contain control characters"),
        ("a\x7fb", "a model name must not contain control characters"),
        ("z" * 201, "a model name must be at most 200 bytes (this one is 201)"),
        ("ok name", None),
        ("z" * 200, None),
        ("ü" * 100, None),
    ],
)
def test_model_name_problem(name: str, problem: str | None) -> None:
    assert model_name_problem(name) == problem


@pytest.mark.parametrize(
    ("body", "key", "problem"),
    [
        ("", "backend", "required key is missing (a backend name, alias or meta backend)"),
        ('backend = ""', "backend", "must not be empty"),
        ("backend = 3", "backend", "expected a string (got integer 3)"),
        (
            'backend = "b"\nmemory_max = "lots"',
            "memory_max",
            'expected a size like 512M, 2G or 80% (got "lots")',
        ),
        (
            'backend = "b"\nmemory_max = "-1G"',
            "memory_max",
            'a size must not be negative (got "-1G")',
        ),
        (
            'backend = "b"\nmemory_max = 0',
            "memory_max",
            'must be greater than 0 (use "infinity" for no limit)',
        ),
        (
            'backend = "b"\nmemory_max = "1G"\nmemory_high = "2G"',
            "memory_high",
            "must not exceed memory_max (1.0 GiB), got 2.0 GiB",
        ),
        (
            'backend = "b"\ngpu_memory = "50%"',
            "gpu_memory",
            'a percentage is not allowed here (got "50%")',
        ),
        (
            'backend = "b"\ngpu_memory = "infinity"',
            "gpu_memory",
            'must be a finite size (got "infinity")',
        ),
        (
            'backend = "b"\nconcurrency_groups = "big"',
            "concurrency_groups",
            'expected an array of strings (got string "big")',
        ),
        (
            'backend = "b"\nconcurrency_groups = ["a", ""]',
            "concurrency_groups[1]",
            'expected a non-empty string (got string "")',
        ),
        (
            'backend = "b"\nconcurrency_groups = [1]',
            "concurrency_groups[0]",
            "expected a non-empty string (got integer 1)",
        ),
        ('backend = "b"\npinned = 1', "pinned", "expected true or false (got integer 1)"),
        (
            'backend = "b"\npreload = "yes"',
            "preload",
            'expected true or false (got string "yes")',
        ),
        (
            'backend = "b"\nidle_timeout = "10 minutes please"',
            "idle_timeout",
            'expected a duration like 90, 500ms, 15m or 1h30m (got "10 minutes please")',
        ),
        (
            'backend = "b"\nbusy_timeout = [1]',
            "busy_timeout",
            "expected a duration like 90, 500ms, 15m or 1h30m (got an array)",
        ),
        ('backend = "b"\nparallel = 0', "parallel", "must be at least 1 (got 0)"),
        ('backend = "b"\nmax_queue = -1', "max_queue", "must be at least 0 (got -1)"),
        ('backend = "b"\nparallel = 1.0', "parallel", "expected an integer (got float 1.0)"),
        (
            'backend = "b"\nrestart = "always"',
            "restart",
            'expected "no" or "on-failure" (got string "always")',
        ),
        ('backend = "b"\nrestart = false', "restart", "expected a string (got boolean false)"),
        ('backend = "b"\nuser = 1000', "user", "expected a string (got integer 1000)"),
        (
            'backend = "b"\ntasks_max = 0',
            "tasks_max",
            "must be between 1 and 18446744073709551614 (got 0)",
        ),
        (
            'backend = "b"\ntasks_max = 18446744073709551616',
            "tasks_max",
            "must be between 1 and 18446744073709551614 (got 18446744073709551616)",
        ),
        ('backend = "a\\u0000b"', "backend", "must not contain NUL characters"),
        (
            'backend = "b"\nconcurrency_groups = ["\\u0000"]',
            "concurrency_groups[0]",
            "must not contain NUL characters",
        ),
        ('backend = "b"\ncpu_weight = 0', "cpu_weight", "must be between 1 and 10000 (got 0)"),
        (
            'backend = "b"\ncpu_weight = 10001',
            "cpu_weight",
            "must be between 1 and 10000 (got 10001)",
        ),
        ('backend = "b"\nmodel = 5', "model", "expected a string (got integer 5)"),
        (
            'backend = "b"\noptions = 5',
            "options",
            "expected a table [options] (got integer 5)",
        ),
    ],
)
def test_model_value_errors(setup: Setup, body: str, key: str, problem: str) -> None:
    path = setup.model("big", body + "\n")
    err = setup.error()
    assert err.file == str(path)
    assert err.key == key
    assert err.problem == problem
    assert str(err) == f"{path}: {key}: {problem}"


def test_example_error_message_from_the_docs(setup: Setup) -> None:
    path = setup.model("big", 'backend = "reference"\nmemory_max = "lots"\n')
    assert str(setup.error()) == (
        f'{path}: memory_max: expected a size like 512M, 2G or 80% (got "lots")'
    )


def test_unknown_model_key(setup: Setup) -> None:
    path = setup.model("m", 'backend = "b"\nmemory_maximum = "1G"\n')
    err = setup.error()
    assert err.file == str(path)
    assert err.key == "memory_maximum"
    assert err.problem.startswith('unknown key (did you mean "memory_max"?); known keys: backend,')
    assert "cpu_weight" in err.problem and "options" in err.problem


def test_unknown_model_key_needing_quotes(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\n"weird key" = 1\n')
    err = setup.error()
    assert err.key == '"weird key"'


def test_model_toml_syntax_error(setup: Setup) -> None:
    path = setup.model("m", 'backend = "b"\nmemory_max = "1G\n')
    err = setup.error()
    assert err.file == str(path)
    assert err.key is None
    assert err.problem.startswith("invalid TOML: ")
    assert "(at line 2, column" in err.problem
    assert str(err).startswith(f"{path}: invalid TOML: ")


def test_model_duplicate_key_is_a_toml_error(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\nbackend = "c"\n')
    assert setup.error().problem.startswith("invalid TOML: ")


def test_first_bad_model_in_name_order_is_reported(setup: Setup) -> None:
    setup.model("b", "backend = 1\n")
    a = setup.model("a", "backend = 2\n")
    assert setup.error().file == str(a)


def test_error_in_model_with_unicode_name(setup: Setup) -> None:
    path = setup.model("grand modèle", 'backend = "b"\nparallel = 0\n')
    assert str(setup.error()) == f"{path}: parallel: must be at least 1 (got 0)"


# --- [options] ----------------------------------------------------------------------------


def test_unknown_option_is_named(setup: Setup) -> None:
    path = setup.model("m", 'backend = "b"\n[options]\nContextSizes = 1\n')
    err = setup.error()
    assert err.key == "options.ContextSizes"
    assert str(err) == (
        f"{path}: options.ContextSizes: not a field of LocalAI's ModelOptions "
        '(did you mean "ContextSize"?)'
    )


def test_unknown_option_without_suggestion(setup: Setup) -> None:
    setup.model("m", 'backend = "b"\n[options]\nzzz = 1\n')
    err = setup.error()
    assert err.key == "options.zzz"
    assert err.problem == "not a field of LocalAI's ModelOptions"


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('ContextSize = "2048"', "options.ContextSize", 'expected an integer (got string "2048")'),
        ("ContextSize = 1.5", "options.ContextSize", "expected an integer (got float 1.5)"),
        ("ContextSize = true", "options.ContextSize", "expected an integer (got boolean true)"),
        (
            "ContextSize = 2147483648",
            "options.ContextSize",
            "must be between -2147483648 and 2147483647 (got 2147483648)",
        ),
        ("F16Memory = 1", "options.F16Memory", "expected true or false (got integer 1)"),
        ("RopeFreqBase = true", "options.RopeFreqBase", "expected a number (got boolean true)"),
        ("Tokenizer = 1", "options.Tokenizer", "expected a string (got integer 1)"),
        ('Options = "a=b"', "options.Options", 'expected an array of strings (got string "a=b")'),
        ('Options = ["a", 1]', "options.Options[1]", "expected a string (got integer 1)"),
        ('LoraScales = [1, "x"]', "options.LoraScales[1]", 'expected a number (got string "x")'),
        ("LoraScales = 0.5", "options.LoraScales", "expected an array of numbers (got float 0.5)"),
        ('Options = [["a"]]', "options.Options[0]", "expected a string (got an array)"),
        ("Threads = {a = 1}", "options.Threads", "expected an integer (got a table)"),
    ],
)
def test_option_type_errors(setup: Setup, line: str, key: str, problem: str) -> None:
    path = setup.model("m", f'backend = "b"\n[options]\n{line}\n')
    err = setup.error()
    assert str(err) == f"{path}: {key}: {problem}"


@pytest.mark.parametrize("field", ["Model", "ModelFile"])
def test_option_model_conflicts_with_model_key(setup: Setup, field: str) -> None:
    path = setup.model("m", f'backend = "b"\nmodel = "x.bin"\n[options]\n{field} = "y.bin"\n')
    assert str(setup.error()) == (
        f'{path}: options.{field}: conflicts with the top-level "model" key; set only one of them'
    )


def test_options_field_list_matches_the_contract() -> None:
    assert len(MODEL_OPTIONS_FIELDS) == 66
    assert {"Model", "ContextSize", "Options", "Overrides", "MMProj"} <= MODEL_OPTIONS_FIELDS
    assert set(MODEL_OPTIONS_TYPES) == MODEL_OPTIONS_FIELDS


def test_options_types_match_generated_protobuf() -> None:
    pb = pytest.importorskip("modeld.rpc.backend_pb2")
    kinds = {9: "str", 5: "int", 8: "bool", 2: "float"}
    scalar = {}
    for field in pb.ModelOptions.DESCRIPTOR.fields:
        if field.type in kinds:
            # is_repeated: protobuf >= 5 (label is deprecated there); label: Debian 12's 4.21
            repeated = (
                field.is_repeated
                if hasattr(field, "is_repeated")
                else field.label == field.LABEL_REPEATED
            )
            scalar[field.name] = kinds[field.type] + ("[]" if repeated else "")
    assert scalar == dict(MODEL_OPTIONS_TYPES)


def test_every_option_field_accepts_a_value_of_its_kind(setup: Setup) -> None:
    samples = {
        "str": '"x"',
        "int": "1",
        "float": "0.5",
        "bool": "true",
        "str[]": '["a", "b"]',
        "float[]": "[0.5]",
    }
    lines = [f"{name} = {samples[kind]}" for name, kind in sorted(MODEL_OPTIONS_TYPES.items())]
    setup.model("all", 'backend = "b"\n[options]\n' + "\n".join(lines) + "\n")
    assert set(setup.load().models["all"].options) == MODEL_OPTIONS_FIELDS


# --- load_model_config and ConfigError ----------------------------------------------------


def test_load_model_config_alone(tmp_path: Path) -> None:
    path = tmp_path / "solo model.toml"
    path.write_text('backend = "b"\nmodel = "w.bin"\n')
    m = load_model_config(path, daemon_defaults(), host_memory=HOST)
    assert m.name == "solo model"
    assert m.model == str(tmp_path / "w.bin")
    assert m.source == path


def test_config_error_attributes_and_one_line() -> None:
    err = ConfigError(Path("/x/a\nb.toml"), "options.Model", "bad\tthing")
    assert err.file == "/x/a\nb.toml"
    assert err.key == "options.Model"
    assert err.problem == "bad\tthing"
    assert str(err) == "/x/a\\nb.toml: options.Model: bad\\tthing"
    assert str(ConfigError("/f", None, "broken")) == "/f: broken"


def test_config_error_is_picklable_enough_for_args() -> None:
    err = ConfigError("/f", "k", "p")
    assert err.args == ("/f", "k", "p")
