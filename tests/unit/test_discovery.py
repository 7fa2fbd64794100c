"""Tests for modeld.discovery: LocalAI-style backends directories."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from modeld.discovery import (
    BUILTIN_BACKENDS_DIR,
    Backend,
    discover_backends,
    effective_backend_dirs,
)


def make_backend(
    root: Path, name: str, *, run: bool = True, metadata: object | str | None = None
) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    if run:
        (directory / "run.sh").write_text("#!/bin/sh\nexec true\n")
        (directory / "run.sh").chmod(0o755)
    if metadata is not None:
        text = metadata if isinstance(metadata, str) else json.dumps(metadata)
        (directory / "metadata.json").write_text(text)
    return directory


def test_single_backend(tmp_path: Path) -> None:
    directory = make_backend(tmp_path, "reference")
    index = discover_backends([tmp_path])
    backend = index.resolve("reference")
    assert backend == Backend(
        name="reference",
        run=directory / "run.sh",
        directory=directory,
        alias=None,
        meta_backend_for=None,
        origin=tmp_path,
    )
    assert index.all() == [backend]
    assert index.problems == []
    assert index.resolve("other") is None


def test_backends_are_listed_in_order(tmp_path: Path) -> None:
    for name in ["zeta", "alpha", "mid"]:
        make_backend(tmp_path, name)
    assert [b.name for b in discover_backends([tmp_path]).all()] == ["alpha", "mid", "zeta"]


def test_first_directory_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_backend(first, "llama")
    make_backend(second, "llama")
    make_backend(second, "whisper")
    index = discover_backends([first, second])
    llama = index.resolve("llama")
    assert llama is not None
    assert llama.origin == first
    assert llama.run == first / "llama" / "run.sh"
    whisper = index.resolve("whisper")
    assert whisper is not None and whisper.origin == second
    assert [(b.name, b.origin) for b in index.all()] == [("llama", first), ("whisper", second)]
    assert index.problems == []


def test_order_of_directories_matters(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_backend(first, "llama")
    make_backend(second, "llama")
    backend = discover_backends([second, first]).resolve("llama")
    assert backend is not None and backend.origin == second


def test_missing_directories_are_fine(tmp_path: Path) -> None:
    make_backend(tmp_path / "real", "b")
    index = discover_backends([tmp_path / "missing", tmp_path / "real", tmp_path / "gone"])
    assert [b.name for b in index.all()] == ["b"]
    assert index.problems == []


def test_backends_dir_that_is_a_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    index = discover_backends([tmp_path / "file"])
    assert index.all() == []


def test_no_directories(tmp_path: Path) -> None:
    index = discover_backends([])
    assert index.all() == []
    assert index.problems == []


def test_alias(tmp_path: Path) -> None:
    make_backend(tmp_path, "cuda12-llama-cpp", metadata={"alias": "llama-cpp"})
    index = discover_backends([tmp_path])
    backend = index.resolve("llama-cpp")
    assert backend is not None
    assert backend.name == "cuda12-llama-cpp"
    assert backend.alias == "llama-cpp"
    assert index.resolve("cuda12-llama-cpp") == backend


def test_direct_name_beats_alias(tmp_path: Path) -> None:
    make_backend(tmp_path, "a-impl", metadata={"alias": "b"})
    make_backend(tmp_path, "b")
    backend = discover_backends([tmp_path]).resolve("b")
    assert backend is not None and backend.name == "b"


def test_direct_name_in_later_directory_beats_alias_in_earlier(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_backend(first, "impl", metadata={"alias": "x"})
    make_backend(second, "x")
    backend = discover_backends([first, second]).resolve("x")
    assert backend is not None and backend.origin == second


def test_first_alias_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_backend(first, "cpu-x", metadata={"alias": "x"})
    make_backend(second, "cuda-x", metadata={"alias": "x"})
    backend = discover_backends([first, second]).resolve("x")
    assert backend is not None and backend.name == "cpu-x"


def test_meta_backend(tmp_path: Path) -> None:
    concrete = make_backend(tmp_path, "cuda12-llama-cpp")
    meta_dir = make_backend(
        tmp_path,
        "llama-cpp",
        run=False,
        metadata={"meta_backend_for": "cuda12-llama-cpp", "name": "llama-cpp"},
    )
    index = discover_backends([tmp_path])
    backend = index.resolve("llama-cpp")
    assert backend == Backend(
        name="llama-cpp",
        run=concrete / "run.sh",
        directory=concrete,
        alias=None,
        meta_backend_for="cuda12-llama-cpp",
        origin=tmp_path,
    )
    assert meta_dir.name == backend.name
    assert {b.name for b in index.all()} == {"cuda12-llama-cpp", "llama-cpp"}
    assert index.problems == []


def test_alias_beats_meta_backend(tmp_path: Path) -> None:
    make_backend(tmp_path, "cpu-x", metadata={"alias": "x"})
    make_backend(tmp_path, "gpu-x")
    make_backend(tmp_path, "x", run=False, metadata={"meta_backend_for": "gpu-x"})
    backend = discover_backends([tmp_path]).resolve("x")
    assert backend is not None and backend.name == "cpu-x"


def test_meta_backend_without_concrete_backend_is_a_problem(tmp_path: Path) -> None:
    make_backend(tmp_path, "llama-cpp", run=False, metadata={"meta_backend_for": "gone"})
    index = discover_backends([tmp_path])
    assert index.resolve("llama-cpp") is None
    assert index.all() == []
    assert len(index.problems) == 1
    assert index.problems[0].startswith(f"{tmp_path / 'llama-cpp'}: skipped: meta backend")
    assert "'gone'" in index.problems[0]


def test_meta_backend_only_looks_in_its_own_directory(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_backend(first, "x", run=False, metadata={"meta_backend_for": "impl"})
    make_backend(second, "impl")
    index = discover_backends([first, second])
    assert index.resolve("x") is None
    assert len(index.problems) == 1


@pytest.mark.parametrize("target", ["..", ".", "a/b", "../escape"])
def test_meta_backend_target_must_be_a_name(tmp_path: Path, target: str) -> None:
    make_backend(tmp_path, "x", run=False, metadata={"meta_backend_for": target})
    index = discover_backends([tmp_path])
    assert index.resolve("x") is None
    assert "not a backend name" in index.problems[0]


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ("{not json", "metadata.json: invalid JSON: "),
        ("", "metadata.json: invalid JSON: "),
        ("[1, 2]", "metadata.json: expected a JSON object"),
        ('{"alias": 3}', "metadata.json: alias: expected a string"),
        ('{"meta_backend_for": ["a"]}', "metadata.json: meta_backend_for: expected a string"),
    ],
)
def test_bad_metadata_is_recorded_and_skipped(tmp_path: Path, metadata: str, reason: str) -> None:
    make_backend(tmp_path, "broken", metadata=metadata)
    make_backend(tmp_path, "fine")
    index = discover_backends([tmp_path])
    assert index.resolve("broken") is None
    assert [b.name for b in index.all()] == ["fine"]
    assert len(index.problems) == 1
    assert index.problems[0].startswith(f"{tmp_path / 'broken'}: skipped: {reason}")
    assert "\n" not in index.problems[0]


def test_metadata_not_utf8_is_recorded(tmp_path: Path) -> None:
    directory = make_backend(tmp_path, "broken")
    (directory / "metadata.json").write_bytes(b'{"alias": "\xff"}')
    index = discover_backends([tmp_path])
    assert index.resolve("broken") is None
    assert index.problems[0].startswith(f"{directory}: skipped: metadata.json: cannot read: ")


def test_broken_backend_does_not_hide_a_later_one(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_backend(first, "x", metadata="oops")
    make_backend(second, "x")
    index = discover_backends([first, second])
    backend = index.resolve("x")
    assert backend is not None and backend.origin == second
    assert len(index.problems) == 1


def test_unknown_metadata_keys_and_nulls_are_ignored(tmp_path: Path) -> None:
    make_backend(
        tmp_path,
        "b",
        metadata={
            "alias": None,
            "meta_backend_for": "",
            "name": "b",
            "gallery_url": "https://example.com",
            "installed_at": "2025-01-01T00:00:00Z",
        },
    )
    backend = discover_backends([tmp_path]).resolve("b")
    assert backend is not None
    assert backend.alias is None
    assert backend.meta_backend_for is None


def test_directory_without_run_sh_is_a_problem(tmp_path: Path) -> None:
    make_backend(tmp_path, "empty", run=False)
    index = discover_backends([tmp_path])
    assert index.all() == []
    assert index.problems == [f"{tmp_path / 'empty'}: skipped: no run.sh"]


def test_run_sh_that_is_a_directory_is_skipped(tmp_path: Path) -> None:
    directory = make_backend(tmp_path, "weird", run=False)
    (directory / "run.sh").mkdir()
    index = discover_backends([tmp_path])
    assert index.resolve("weird") is None
    assert index.problems == [f"{directory}: skipped: run.sh is not a regular file"]


def test_dangling_run_sh_symlink_is_skipped(tmp_path: Path) -> None:
    directory = make_backend(tmp_path, "dangling", run=False)
    (directory / "run.sh").symlink_to(tmp_path / "nowhere")
    index = discover_backends([tmp_path])
    assert index.resolve("dangling") is None
    assert index.problems == [f"{directory}: skipped: run.sh is not a regular file"]


def test_run_sh_symlink_to_a_file_is_fine(tmp_path: Path) -> None:
    target = tmp_path / "real-run.sh"
    target.write_text("#!/bin/sh\n")
    target.chmod(0o755)
    directory = make_backend(tmp_path / "backends", "linked", run=False)
    (directory / "run.sh").symlink_to(target)
    backend = discover_backends([tmp_path / "backends"]).resolve("linked")
    assert backend is not None and backend.run == directory / "run.sh"


def test_files_and_hidden_entries_are_ignored(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("not a backend")
    make_backend(tmp_path, ".partial-install")
    make_backend(tmp_path, "ok")
    index = discover_backends([tmp_path])
    assert [b.name for b in index.all()] == ["ok"]
    assert index.problems == []


def test_symlinked_backend_directory(tmp_path: Path) -> None:
    real = make_backend(tmp_path / "store", "impl")
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "linked").symlink_to(real)
    backend = discover_backends([tmp_path / "backends"]).resolve("linked")
    assert backend is not None and backend.directory == tmp_path / "backends" / "linked"


def test_unlistable_backends_dir_is_a_problem(tmp_path: Path) -> None:
    root = tmp_path / "not-a-directory"
    root.write_text("")  # listing fails (also for root, unlike a chmod 0 directory)
    index = discover_backends([root])
    assert index.all() == []
    assert index.problems[0].startswith(f"{root}: cannot list backends directory")


def test_index_accessors_return_copies(tmp_path: Path) -> None:
    make_backend(tmp_path, "b", run=False)
    index = discover_backends([tmp_path])
    index.all().append(None)  # type: ignore[arg-type]
    index.problems.clear()
    assert index.all() == []
    assert len(index.problems) == 1


def test_effective_backend_dirs_appends_builtin() -> None:
    configured = (Path("/var/lib/modeld/backends"), Path("/usr/lib/modeld/backends"))
    assert effective_backend_dirs(configured) == (*configured, BUILTIN_BACKENDS_DIR)
    assert effective_backend_dirs([]) == (BUILTIN_BACKENDS_DIR,)


def test_effective_backend_dirs_does_not_duplicate_builtin() -> None:
    configured = [BUILTIN_BACKENDS_DIR, Path("/opt/b")]
    assert effective_backend_dirs(configured) == (BUILTIN_BACKENDS_DIR, Path("/opt/b"))


def test_builtin_dir_location() -> None:
    import modeld.discovery

    assert Path(modeld.discovery.__file__).parent / "data" / "backends" == BUILTIN_BACKENDS_DIR


@pytest.mark.skipif(
    not (BUILTIN_BACKENDS_DIR / "reference" / "run.sh").exists(),
    reason="built-in reference backend not installed yet",
)
def test_builtin_reference_backend_is_discovered() -> None:
    index = discover_backends(effective_backend_dirs([]))
    backend = index.resolve("reference")
    assert backend is not None
    assert backend.origin == BUILTIN_BACKENDS_DIR


def test_a_backend_whose_python_module_is_missing_is_listed_unavailable(tmp_path: Path) -> None:
    make_backend(
        tmp_path,
        "engine",
        metadata={
            "requires_python_modules": ["json", "modeld_no_such_module_xyz"],
            "install_hint": "pip install the-engine",
        },
    )
    make_backend(tmp_path, "plain", metadata={"requires_python_modules": ["json"]})
    index = discover_backends([tmp_path])
    engine = index.resolve("engine")
    assert engine is not None
    assert engine.unavailable == (
        "needs the Python module modeld_no_such_module_xyz: pip install the-engine"
    )
    plain = index.resolve("plain")
    assert plain is not None and plain.unavailable is None
    assert index.problems == []


def test_a_meta_backend_inherits_its_targets_requirements(tmp_path: Path) -> None:
    make_backend(tmp_path, "cpu-engine", metadata={"requires_python_modules": ["no.such.mod"]})
    make_backend(tmp_path, "engine", run=False, metadata={"meta_backend_for": "cpu-engine"})
    meta = discover_backends([tmp_path]).resolve("engine")
    assert meta is not None and meta.unavailable == "needs the Python module no.such.mod"


@pytest.mark.parametrize("modules", ["llama_cpp", [""], [3], {"a": 1}])
def test_malformed_requirements_skip_the_backend(tmp_path: Path, modules: object) -> None:
    make_backend(tmp_path, "engine", metadata={"requires_python_modules": modules})
    index = discover_backends([tmp_path])
    assert index.resolve("engine") is None
    assert "requires_python_modules: expected a list of module names" in index.problems[0]


def test_the_shipped_llama_cpp_backend_needs_llama_cpp_python() -> None:
    import importlib.util

    backend = discover_backends(effective_backend_dirs([])).resolve("llama-cpp")
    assert backend is not None and backend.origin == BUILTIN_BACKENDS_DIR
    installed = importlib.util.find_spec("llama_cpp") is not None
    assert (backend.unavailable is None) == installed
    if not installed:
        assert "pip install 'modeld[llama-cpp]'" in (backend.unavailable or "")


# --- hostile backend directories (issue 8) -------------------------------------------------


def test_a_run_sh_nobody_may_execute_is_skipped(tmp_path: Path) -> None:
    make_backend(tmp_path, "noexec")
    (tmp_path / "noexec" / "run.sh").chmod(0o644)
    make_backend(tmp_path, "meta", run=False, metadata={"meta_backend_for": "noexec"})
    index = discover_backends([tmp_path])
    assert index.resolve("noexec") is None and index.resolve("meta") is None
    assert f"{tmp_path / 'noexec'}: skipped: run.sh is not executable" in index.problems
    assert any("whose run.sh is not executable" in p for p in index.problems)


def test_meta_backends_pointing_in_a_circle_are_skipped(tmp_path: Path) -> None:
    make_backend(tmp_path, "a", run=False, metadata={"meta_backend_for": "b"})
    make_backend(tmp_path, "b", run=False, metadata={"meta_backend_for": "a"})
    make_backend(tmp_path, "self", run=False, metadata={"meta_backend_for": "self"})
    index = discover_backends([tmp_path])
    assert index.all() == []
    assert len(index.problems) == 3
    assert all("which has no run.sh" in p for p in index.problems)


def test_a_meta_backend_of_a_meta_backend_is_not_followed(tmp_path: Path) -> None:
    make_backend(tmp_path, "real")
    make_backend(tmp_path, "first", run=False, metadata={"meta_backend_for": "real"})
    make_backend(tmp_path, "second", run=False, metadata={"meta_backend_for": "first"})
    index = discover_backends([tmp_path])
    first = index.resolve("first")
    assert first is not None and first.run == tmp_path / "real" / "run.sh"
    assert index.resolve("second") is None


def test_a_metadata_pipe_is_refused_without_blocking(tmp_path: Path) -> None:
    """Discovery runs on modeld's event loop: a FIFO nobody writes to must not block it."""
    make_backend(tmp_path, "piped")
    os.mkfifo(tmp_path / "piped" / "metadata.json")
    found: list[list[str]] = []
    thread = threading.Thread(
        target=lambda: found.append(discover_backends([tmp_path]).problems), daemon=True
    )
    thread.start()
    thread.join(10)
    if thread.is_alive():
        with open(tmp_path / "piped" / "metadata.json", "wb"):
            pass
    assert found == [[f"{tmp_path / 'piped'}: skipped: metadata.json: not a regular file"]]


def test_metadata_from_a_device_or_too_large_is_skipped(tmp_path: Path) -> None:
    make_backend(tmp_path, "zero")
    (tmp_path / "zero" / "metadata.json").symlink_to("/dev/zero")
    make_backend(tmp_path, "huge", metadata='{"x": "' + "y" * 70000 + '"}')
    problems = discover_backends([tmp_path]).problems
    assert f"{tmp_path / 'zero'}: skipped: metadata.json: not a regular file" in problems
    assert f"{tmp_path / 'huge'}: skipped: metadata.json: larger than 65536 bytes" in problems


@pytest.mark.parametrize(
    "metadata",
    ["", "null", "[]", '{"alias": 5}', '{"meta_backend_for": ["x"]}', "{" * 5000, '"\\ud800"'],
)
def test_broken_metadata_never_raises(tmp_path: Path, metadata: str) -> None:
    make_backend(tmp_path, "broken", metadata=metadata)
    make_backend(tmp_path, "fine")
    index = discover_backends([tmp_path])
    assert index.resolve("fine") is not None
    broken = index.resolve("broken")
    assert broken is None or broken.alias is None
