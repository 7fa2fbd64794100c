"""Fixtures for tests against a real systemd + D-Bus booted in namespaces (tests/sandbox/).

- ``sandbox`` (session): one booted instance per test process (xdist worker), with the
  project's D-Bus policy (systemd/org.modeld1.conf, if present) and DBUS_POLICY_FILES.
- ``sandbox_units`` (function): the same instance; units installed through it during the
  test are stopped and removed afterwards.
- ``polkit_sandbox`` (module): an instance of the module's own, with the real polkitd's files
  in place (the project's polkit policy, the rules in ``polkit_rules``); tests start and stop
  polkitd themselves. It is not the session's sandbox, where polkitd never runs.

Tests marked ``systemd`` are skipped when the sandbox cannot run here (not root, tools
missing) or fails to boot, unless MODELD_REQUIRE_SANDBOX=1 (CI): then they fail.
A failed test that used the sandbox gets the tail of its journal in the report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the sandbox package

from sandbox import Sandbox, SandboxError, live_sandboxes, missing_prerequisites, polkit_missing

REPO = Path(__file__).resolve().parents[2]
MODELD_POLICY = REPO / "systemd" / "org.modeld1.conf"
MODELD_POLKIT_POLICY = REPO / "systemd" / "org.modeld1.policy"
JOURNAL_TAIL = 200


def _required() -> bool:
    return os.environ.get("MODELD_REQUIRE_SANDBOX") == "1"


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail loudly when the sandbox is required (CI)."""
    if _required():
        pytest.fail(
            f"MODELD_REQUIRE_SANDBOX=1 but the systemd sandbox is unusable: {reason}", pytrace=False
        )
    pytest.skip(f"systemd sandbox unavailable: {reason}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("systemd") is not None:
        reason = missing_prerequisites()
        if reason:
            _unavailable(reason)


def _policy_files() -> list[str]:
    files = [p for p in os.environ.get("DBUS_POLICY_FILES", "").split(":") if p]
    if MODELD_POLICY.is_file():
        files.append(str(MODELD_POLICY))
    return files


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """The session's booted sandbox (booted from the main thread, stopped at the end)."""
    reason = missing_prerequisites()
    if reason:
        _unavailable(reason)
    error = None
    try:
        sb = Sandbox.boot(dbus_policy_files=_policy_files())
    except SandboxError as e:
        error = str(e)
    if error is not None:  # outside the except block: no chained traceback in the report
        _unavailable(error)
    try:
        yield sb
    finally:
        sb.stop()  # raises (an error in the last test's teardown) if anything is left


@pytest.fixture(scope="module")
def polkit_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory the ``polkit_sandbox``'s polkitd reads as /etc/polkit-1/rules.d."""
    return tmp_path_factory.mktemp("polkit-rules")


@pytest.fixture(scope="module")
def polkit_sandbox(polkit_rules: Path) -> Iterator[Sandbox]:
    """A sandbox of the module's own, ready to run the real polkitd (not started yet)."""
    reason = missing_prerequisites() or polkit_missing()
    if reason:
        _unavailable(reason)
    error = None
    try:
        sb = Sandbox.boot(dbus_policy_files=_policy_files())
    except SandboxError as e:
        error = str(e)
    if error is not None:
        _unavailable(error)
    try:
        sb.setup_polkit([MODELD_POLKIT_POLICY], polkit_rules)
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def sandbox_units(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The session sandbox; units the test installs are stopped and removed after it."""
    before = set(sandbox.installed_units())
    yield sandbox
    sandbox.remove_units(u for u in sandbox.installed_units() if u not in before)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    uses_sandbox = item.get_closest_marker("systemd") is not None or any(
        name.startswith("sandbox") for name in getattr(item, "fixturenames", ())
    )
    if report.failed and uses_sandbox:
        for sb in live_sandboxes():
            report.sections.append(
                (
                    f"sandbox {sb.name} journal (last {JOURNAL_TAIL} lines)",
                    sb.journal(lines=JOURNAL_TAIL),
                )
            )
    return report
