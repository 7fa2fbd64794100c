"""The .deb on a fresh Debian 12: install, socket activation, D-Bus, upgrade, downgrade, purge.

What a user gets from ``apt install ./dist/modeld_*.deb``, checked on a system that has only
Debian's packages: ``packaging/build-deb.sh`` builds version N and N+1 (the same tree with a
bumped version), mmdebstrap makes a bookworm root with systemd and dbus (cached as a tarball
in ``$MODELD_BUILD_CACHE``, default ``/var/cache/modeld-build``, together with the .debs apt
will need, so reruns are offline and fast), and the sandbox boots that root's own systemd as
PID 1 of new namespaces with no network (``tests/sandbox/boot-systemd.sh``, ROOT_DIR mode).
Inside, apt installs the package and resolves its dependencies from Debian's metadata; the
tests then drive the installed system as an administrator would: systemctl, busctl,
modeldctl, apt-get.

The tests run in file order and share one booted root: each one starts from the state the
previous one left (installed, loaded, upgraded, ...).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sandbox import Sandbox, SandboxError

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]
BUILD_DEB = REPO / "packaging" / "build-deb.sh"
CACHE = Path(os.environ.get("MODELD_BUILD_CACHE", "/var/cache/modeld-build"))
CACHE_DAYS = 7  # then the root is made again: Debian's point releases replace packages
SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "dbus")  # to boot; everything else comes with the .deb
DEMO_PATH = "/org/modeld1/model/demo"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _required() -> bool:
    return os.environ.get("MODELD_REQUIRE_SANDBOX") == "1"


def _unavailable(reason: str) -> NoReturn:
    if _required():
        pytest.fail(f"installed-system test cannot run: {reason}", pytrace=False)
    pytest.skip(f"installed-system test cannot run: {reason}")


def _run(argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8", "HOME": os.environ.get("HOME", "/root")},
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


# ---------------------------------------------------------------- packages and root
class Debs:
    """The two builds: ``old`` (debian/changelog's version N) and ``new`` (N+1)."""

    def __init__(self, old_version: str, old: Path, new_version: str, new: Path) -> None:
        self.old_version, self.old = old_version, old
        self.new_version, self.new = new_version, new


@pytest.fixture(scope="module")
def debs() -> Debs:
    for tool in ("dpkg-buildpackage", "dh", "mmdebstrap", "lintian"):
        if shutil.which(tool, path=CLEAN_PATH) is None:
            _unavailable(f"{tool} is not installed (scripts/setup installs it)")
    version = _run(
        ["dpkg-parsechangelog", "-l", str(REPO / "packaging/debian/changelog"), "-S", "Version"]
    ).stdout.strip()
    bumped = f"{version}+test1"
    _run([str(BUILD_DEB)])
    _run([str(BUILD_DEB), "--version", bumped])
    dist = REPO / "dist"
    return Debs(
        version, dist / f"modeld_{version}_all.deb", bumped, dist / f"modeld_{bumped}_all.deb"
    )


def _control_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


def _root_tarball(deb: Path) -> Path:
    """A cached bookworm root: systemd, dbus, Debian's package lists and, in apt's archive
    cache, every .deb that installing ``deb`` pulls in (with Recommends). Keyed by the
    recipe and the package's relations, remade after CACHE_DAYS."""
    recipe = [
        "mmdebstrap", "--mode=root", "--format=tar", "--variant=apt",
        f"--include={','.join(BASE_PACKAGES)}",
        "--skip=cleanup/apt/lists,cleanup/apt/cache",
    ]  # fmt: skip
    relations = [_control_field(deb, f) for f in ("Depends", "Recommends", "Pre-Depends")]
    key = hashlib.sha256(json.dumps([SUITE, recipe, relations]).encode()).hexdigest()[:16]
    tarball = CACHE / f"{SUITE}-root-{key}.tar"
    if tarball.exists() and time.time() - tarball.stat().st_mtime < CACHE_DAYS * 86400:
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / f".partial-{tarball.name}"  # ends in .tar, as mmdebstrap wants
    partial.unlink(missing_ok=True)
    name = deb.name
    _run(
        [
            *recipe,
            f"--customize-hook=copy-in {deb} /tmp",
            '--customize-hook=chroot "$1" apt-get install --download-only -y -q '
            f"-o APT::Install-Recommends=true /tmp/{name}",
            f'--customize-hook=rm "$1"/tmp/{name}',
            SUITE,
            str(partial),
        ],
        timeout=1800,
    )
    partial.rename(tarball)
    for old in CACHE.glob(f"{SUITE}-root-*.tar"):
        if old != tarball:
            old.unlink()
    return tarball


@pytest.fixture(scope="module")
def system(debs: Debs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A fresh bookworm root, booted; the .debs are in its /var/tmp."""
    try:
        tarball = _root_tarball(debs.old)
    except AssertionError as err:  # typically: no way to reach deb.debian.org
        _unavailable(f"could not make the {SUITE} root: {err}")
    root = tmp_path_factory.mktemp("root")
    _run(["tar", "-C", str(root), "-xf", str(tarball)])
    (root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")  # not a first boot
    for deb in (debs.old, debs.new):
        shutil.copy(deb, root / "var" / "tmp" / deb.name)
    try:
        sb = Sandbox.boot(root=root, netns=True)
    except SandboxError as err:
        _unavailable(str(err))
    try:
        yield sb
    finally:
        sb.stop()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- helpers
def apt(sb: Sandbox, *args: str) -> str:
    """apt-get inside, offline (no network namespace): everything must come from the cache."""
    proc = sb.exec(
        "apt-get", "-y", "-q", "-o", "Dpkg::Use-Pty=0", *args,
        env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"apt-get {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def installed_version(sb: Sandbox) -> str:
    proc = sb.exec(
        "dpkg-query", "-W", "-f", "${db:Status-Abbrev}|${Version}", "modeld", check=False
    )
    status, _, version = proc.stdout.partition("|")
    return version.strip() if status.strip() == "ii" else ""


def prop(sb: Sandbox, name: str) -> str:
    """A property of the demo model, as busctl prints it (``s "ready"``, ``u 42``)."""
    return sb.busctl(
        "get-property", "org.modeld1", DEMO_PATH, "org.modeld1.Model", name
    ).stdout.strip()


def int_prop(sb: Sandbox, name: str) -> int:
    return int(prop(sb, name).split()[1])


def str_prop(sb: Sandbox, name: str) -> str:
    return str(json.loads(prop(sb, name).split(" ", 1)[1]))


def status_field(sb: Sandbox, pid: int, field: str) -> str:
    for line in sb.exec("cat", f"/proc/{pid}/status").stdout.splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def user_of(sb: Sandbox, pid: int) -> str:
    return sb.exec("stat", "-c", "%U", f"/proc/{pid}").stdout.strip()


def http_request(sb: Sandbox, method: str, path: str, body: object = None) -> tuple[int, str]:
    """One HTTP request over the installed /run/modeld/api.sock (seen from the host)."""

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(60)
            self.sock.connect(str(sb.run_dir / "modeld" / "api.sock"))

    conn = Conn("modeld")
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def completes(sb: Sandbox) -> str:
    status, text = http_request(
        sb, "POST", "/v1/completions", {"model": "demo", "prompt": "The sea", "max_tokens": 4}
    )
    assert status == 200, text
    return str(json.loads(text)["choices"][0]["text"])


def processes(sb: Sandbox) -> list[str]:
    """``user command line`` of every process inside, except the kernel's and the probe's."""
    script = (
        'for p in /proc/[0-9]*; do c=$(tr "\\0" " " < $p/cmdline 2>/dev/null) || continue; '
        '[ -n "$c" ] && echo "$(stat -c %U $p) $c"; done'
    )
    return sb.exec("sh", "-c", script).stdout.splitlines()


# ---------------------------------------------------------------- the tests
def test_apt_install_enables_and_starts_only_the_socket(system: Sandbox, debs: Debs) -> None:
    out = apt(system, "install", f"/var/tmp/{debs.old.name}")
    assert "python3-grpcio" in out, "dependencies did not come from Debian's archive"
    assert installed_version(system) == debs.old_version
    assert system.systemctl("is-enabled", "modeld.socket").stdout.strip() == "enabled"
    assert system.show("modeld.socket", "ActiveState") == "active"
    assert system.show("modeld.socket", "Listen") == "/run/modeld/api.sock (Stream)"
    assert system.show("modeld.service", "ActiveState") == "inactive"
    assert system.exec("getent", "passwd", "modeld").stdout.startswith("modeld:")
    docs = system.show("modeld.service", "Documentation")
    assert "man:modeld(8)" in docs
    for page in ("man8/modeld.8.gz", "man1/modeldctl.1.gz", "man5/modeld.toml.5.gz",
                 "man5/org.modeld1.5.gz"):  # fmt: skip
        system.exec("test", "-s", f"/usr/share/man/{page}")


def test_first_connection_starts_modeld(system: Sandbox) -> None:
    status, text = http_request(system, "GET", "/healthz")
    assert status == 200, text
    assert json.loads(text)["status"] == "ok"
    assert system.show("modeld.service", "ActiveState") == "active"


def test_busctl_loads_demo_into_a_scope_of_modeld_slice(system: Sandbox) -> None:
    system.busctl("call", "org.modeld1", "/org/modeld1", "org.modeld1.Manager", "Load",
                  "sa{sv}", "demo", "1", "wait", "b", "true")  # fmt: skip
    assert str_prop(system, "State") == "ready"
    unit = str_prop(system, "Unit")
    assert unit.startswith("modeld-backend-demo-") and unit.endswith(".scope")
    assert system.show(unit, "Slice") == "modeld.slice"
    assert str_prop(system, "ControlGroup") == f"/modeld.slice/{unit}"
    backend = int_prop(system, "MainPID")
    assert user_of(system, backend) == "modeld"
    assert completes(system)

    # the hardening of modeld.service holds, and the backends (its children) inherit it
    daemon = int(system.show("modeld.service", "MainPID"))
    for pid in (daemon, backend):
        assert status_field(system, pid, "NoNewPrivs") == "1"
        assert int(status_field(system, pid, "CapBnd"), 16) & (1 << 21) == 0  # no CAP_SYS_ADMIN
    mounts = {
        line.split()[4]: line.split()[5]
        for line in system.exec("cat", f"/proc/{daemon}/mountinfo").stdout.splitlines()
    }
    assert mounts["/"].startswith("ro"), "ProtectSystem=strict: / is read-only for modeld"
    assert mounts["/run/modeld"].startswith("rw")

    system.busctl("call", "org.modeld1", "/org/modeld1", "org.modeld1.Manager", "Unload",
                  "sa{sv}", "demo", "0")  # fmt: skip
    assert str_prop(system, "State") == "unloaded"
    assert system.show(unit, "ActiveState") == "inactive"


def test_modeldctl_works(system: Sandbox) -> None:
    status = system.exec("modeldctl", "status")
    assert status.stdout.startswith("Version:")
    listed = json.loads(system.exec("modeldctl", "--json", "list").stdout)
    assert "demo" in json.dumps(listed)
    system.exec("modeldctl", "config", "check")
    assert "modeld(8)" in system.exec("modeld", "--help").stdout
    assert "modeldctl(1)" in system.exec("modeldctl", "--help").stdout


def test_upgrade_restarts_modeld_and_keeps_the_backend(system: Sandbox, debs: Debs) -> None:
    system.exec("modeldctl", "load", "demo")
    daemon = system.show("modeld.service", "MainPID")
    backend, unit = int_prop(system, "MainPID"), str_prop(system, "Unit")

    apt(system, "install", f"/var/tmp/{debs.new.name}")

    assert installed_version(system) == debs.new_version
    assert system.show("modeld.service", "ActiveState") == "active"
    assert system.show("modeld.service", "MainPID") != daemon, "modeld was not restarted"
    assert (str_prop(system, "State"), int_prop(system, "MainPID")) == ("ready", backend)
    assert str_prop(system, "Unit") == unit
    assert system.show(unit, "ActiveState") == "active"
    assert completes(system)


def test_downgrade_behaves_like_an_upgrade(system: Sandbox, debs: Debs) -> None:
    daemon = system.show("modeld.service", "MainPID")
    backend = int_prop(system, "MainPID")

    apt(system, "install", "--allow-downgrades", f"/var/tmp/{debs.old.name}")

    assert installed_version(system) == debs.old_version
    assert system.show("modeld.service", "MainPID") != daemon
    assert (str_prop(system, "State"), int_prop(system, "MainPID")) == ("ready", backend)
    assert completes(system)


def test_remove_stops_everything_and_keeps_the_configuration(system: Sandbox) -> None:
    unit = str_prop(system, "Unit")

    apt(system, "remove", "modeld")

    assert installed_version(system) == ""
    for name in ("modeld.socket", "modeld.service", "modeld.slice", unit):
        assert system.show(name, "ActiveState") == "inactive", name
    assert not any("modeld" in p for p in processes(system))
    system.exec("test", "-f", "/etc/modeld/modeld.toml")  # conffiles stay until purge
    system.exec("test", "!", "-e", "/lib/systemd/system/modeld.service")
    assert not (system.run_dir / "modeld").exists()


def test_purge_leaves_nothing_behind(system: Sandbox) -> None:
    apt(system, "purge", "modeld")

    listed = system.exec("dpkg-query", "-W", "modeld", check=False)
    assert listed.returncode != 0 or listed.stdout.strip() in ("", "modeld\t"), listed.stdout
    for path in (
        "/etc/modeld",
        "/lib/systemd/system/modeld.service",
        "/lib/systemd/system/modeld.socket",
        "/lib/systemd/system/modeld.slice",
        "/etc/systemd/system/sockets.target.wants/modeld.socket",
        "/usr/share/dbus-1/system.d/org.modeld1.conf",
        "/usr/share/dbus-1/system-services/org.modeld1.service",
        "/usr/share/polkit-1/actions/org.modeld1.policy",
        "/usr/bin/modeld",
    ):
        system.exec("test", "!", "-e", path)
    assert system.show("modeld.service", "LoadState") == "not-found"
    units = system.systemctl("list-units", "--all", "--plain", "--no-legend", "modeld*").stdout
    assert units.strip() == ""
    assert not any("modeld" in p for p in processes(system))
    assert not (system.memcg_dir / "modeld.slice").exists()


# ---------------------------------------------------------------- package linters
def test_lintian_is_clean_down_to_pedantic(debs: Debs) -> None:
    """No tag at all at -EvIL +pedantic beyond the overrides (each with its reason)."""
    arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    changes = REPO / "dist" / f"modeld_{debs.old_version}_{arch}.changes"
    _run(["lintian", "-EvIL", "+pedantic", "--fail-on",
          "error,warning,info,pedantic,experimental", str(changes)])  # fmt: skip


def test_rpm_builds_runs_its_unit_tests_and_is_rpmlint_clean() -> None:
    for tool in ("rpmbuild", "rpmlint"):
        if shutil.which(tool, path=CLEAN_PATH) is None:
            _unavailable(f"{tool} is not installed (scripts/setup installs it)")
    out = _run([str(REPO / "packaging" / "build-rpm.sh"), "--lint"]).stdout
    assert re.search(r"^\d+ passed", out, re.M), "%check did not run the unit tests"
    assert "0 errors, 0 warnings" in out
