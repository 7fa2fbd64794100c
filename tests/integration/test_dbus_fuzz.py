"""Fuzzing the real D-Bus API of a running modeld in the sandbox (issue 8, item 3).

Hypothesis generates model names of every length and character (control characters but
NUL, which D-Bus strings cannot hold; path tricks; unicode), option dicts with wrong types
and unknown keys, object paths and property writes, and calls racing a Reload and a
``systemctl restart``. Every reply must be a method return or one of the API's named errors
(never ``Internal``, never a lost reply), modeld must not restart or stop serving, and
afterwards its state must match systemd's. ``MODELD_FUZZ_EXAMPLES`` raises the number of
examples (CI: the defaults below, well under a minute).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest
from busclient import call, connect
from dbus_next import Variant
from dbus_next.constants import MessageType
from dbus_next.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

from modeld.config import model_name_problem
from modeld.naming import bus_path_escape

pytestmark = pytest.mark.systemd

EXAMPLES = int(os.environ.get("MODELD_FUZZ_EXAMPLES", "0"))


def budget(default: int) -> settings:
    return settings(
        max_examples=EXAMPLES or default,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not EXAMPLES,  # CI: the same examples each run; on demand: new ones
    )


API_ERRORS = {
    *(
        f"org.modeld1.Error.{name}"
        for name in (
            "NoSuchModel",
            "NoSuchBackend",
            "LoadFailed",
            "Busy",
            "InsufficientResources",
            "InvalidConfig",
            "AccessDenied",
        )
    ),
    *(
        f"org.freedesktop.DBus.Error.{name}"
        for name in (
            "InvalidArgs",
            "UnknownMethod",
            "UnknownObject",
            "UnknownInterface",
            "UnknownProperty",
            "PropertyReadOnly",
            "InvalidSignature",
        )
    ),
}
RESTARTING_ERRORS = {
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.Spawn.Failed",
    "org.freedesktop.DBus.Error.TimedOut",
}
"""What a call may get while modeld itself is restarting (and only then)."""

PATH_TRICKS = (
    "",
    ".",
    "..",
    "../fz",
    "fz/../fz",
    "/fz",
    "fz/",
    "fz\n",
    " fz",
    "fz\x7f",
    "\x1b[2J",
    "-fz",
    "fz.scope",
    "modeld-backend-fz-1",
    "org.modeld1",
    "%2e%2e",
    "fz\t",
    "*",
    "\u202efz",
    "\uff46\uff5a",
)
names = st.one_of(
    st.sampled_from(PATH_TRICKS),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")),
    st.integers(min_value=0, max_value=300_000).map(lambda n: "f" * n),
    st.sampled_from(["fz", "weird one"]),
)


def bus_text(max_size: int) -> st.SearchStrategy[str]:
    """Strings D-Bus can carry: UTF-8 without NUL (the bus drops a sender of anything else)."""
    return st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
        max_size=max_size,
    )


def variants() -> st.SearchStrategy[Variant]:
    leaf = st.one_of(
        st.booleans().map(lambda v: Variant("b", v)),
        bus_text(20).map(lambda v: Variant("s", v)),
        st.integers(-(2**31), 2**31 - 1).map(lambda v: Variant("i", v)),
        st.integers(0, 2**64 - 1).map(lambda v: Variant("t", v)),
        st.floats(allow_nan=True).map(lambda v: Variant("d", v)),
        st.binary(max_size=10).map(lambda v: Variant("ay", v)),
        st.lists(bus_text(5), max_size=3).map(lambda v: Variant("as", v)),
    )
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            inner.map(lambda v: Variant("v", v)),
            st.dictionaries(bus_text(5), inner, max_size=2).map(lambda v: Variant("a{sv}", v)),
        ),
        max_leaves=3,
    )


options = st.dictionaries(
    st.sampled_from(["wait", "force", "Wait", "timeout", ""]) | bus_text(10),
    variants(),
    max_size=3,
)
path_elements = st.from_regex(r"[A-Za-z0-9_]{1,40}", fullmatch=True)


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = deploy(
        sandbox,
        tmp_path_factory.mktemp("modeld-dbus-fuzz"),
        {"fz": reference_model(), "weird one": reference_model()},
    )
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


@pytest.fixture
def unharmed(modeld: Modeld) -> Iterator[None]:
    """modeld is the same process afterwards, serves, and matches systemd once idle."""
    before = modeld.main_pid()
    yield
    assert modeld.main_pid() == before, "modeld was restarted"
    settle(modeld)


def settle(modeld: Modeld) -> None:
    """Unload everything (forced), then check modeld against systemd."""
    for name, _state, _backend, _path in modeld.call("ListModels")[0]:
        modeld.unload(name, force=True)
    modeld.assert_consistent()
    assert modeld.scopes() == []
    modeld.assert_serves("fz")
    modeld.unload("fz", force=True)


def check(reply: Message, *, restarting: bool = False) -> None:
    """A reply is a return or a named error of the API, with one line of text."""
    if reply.message_type is MessageType.METHOD_RETURN:
        return
    assert reply.message_type is MessageType.ERROR
    allowed = API_ERRORS | (RESTARTING_ERRORS if restarting else set())
    text = reply.body[0] if reply.body else ""
    assert reply.error_name in allowed, (reply.error_name, text)
    assert "Traceback" not in text, text
    if reply.error_name.startswith("org.modeld1."):  # modeld's own: never the caller's 300 kB
        assert len(text) < 1024, text[:300]


async def fuzz_calls(bus: Any, name: str, opts: dict[str, Variant], element: str) -> None:
    model_path = f"/org/modeld1/model/{element}"
    calls: list[tuple[str, str, list[Any], str, str]] = [
        ("GetModel", "s", [name], "/org/modeld1", "org.modeld1.Manager"),
        ("Load", "sa{sv}", [name, opts], "/org/modeld1", "org.modeld1.Manager"),
        (
            "Unload",
            "sa{sv}",
            [name, {**opts, "force": Variant("b", True)}],
            "/org/modeld1",
            "org.modeld1.Manager",
        ),
        ("Acquire", "sa{sv}", [name, opts], "/org/modeld1", "org.modeld1.Manager"),
        ("Load", "s", [name], "/org/modeld1", "org.modeld1.Manager"),
        ("Load", "sa{sv}s", [name, {}, name], "/org/modeld1", "org.modeld1.Manager"),
        ("Unload", "i", [7], "/org/modeld1", "org.modeld1.Manager"),
        ("Load", "a{sv}", [opts], model_path, "org.modeld1.Model"),
        ("SetPinned", "b", [False], model_path, "org.modeld1.Model"),
        ("SetPinned", "s", [name], model_path, "org.modeld1.Model"),
        (
            "Get",
            "ss",
            ["org.modeld1.Model", "State"],
            model_path,
            "org.freedesktop.DBus.Properties",
        ),
        ("GetAll", "s", ["org.modeld1.Model"], model_path, "org.freedesktop.DBus.Properties"),
        (
            "Get",
            "ss",
            ["org.modeld1.Manager", name],
            "/org/modeld1",
            "org.freedesktop.DBus.Properties",
        ),
        (
            "Set",
            "ssv",
            ["org.modeld1.Manager", "MaxLoaded", next(iter(opts.values()), Variant("s", name))],
            "/org/modeld1",
            "org.freedesktop.DBus.Properties",
        ),
        (
            "Set",
            "ssv",
            ["org.modeld1.Model", "Pinned", Variant("b", True)],
            model_path,
            "org.freedesktop.DBus.Properties",
        ),
    ]
    for member, signature, body, path, interface in calls:
        reply = await call(bus, member, signature, body, path=path, interface=interface)
        check(reply)
        if member == "Acquire" and reply.message_type is MessageType.METHOD_RETURN:
            for fd in reply.unix_fds:
                os.close(fd)  # the lease ends


@budget(60)
@given(name=names, opts=options, element=path_elements)
def test_any_call_gets_a_return_or_a_named_error(
    modeld: Modeld, unharmed: None, name: str, opts: dict[str, Variant], element: str
) -> None:
    async def run() -> None:
        async with connect(modeld.sandbox.bus_address) as bus:
            await fuzz_calls(bus, name, opts, element)
            await fuzz_calls(bus, name, opts, bus_path_escape(name)[:200] or "_")

    asyncio.run(run())


configurable = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\x85"),
    min_size=1,
    max_size=70,
).filter(lambda n: model_name_problem(n) is None and len(f"{n}.toml".encode()) <= 255)


@budget(8)
@given(name=configurable)
def test_a_model_of_any_valid_name_loads_and_unloads_cleanly(
    modeld: Modeld, unharmed: None, name: str
) -> None:
    """Escaping into unit names, object paths and socket directories works for every name."""
    modeld.models = {
        "fz": reference_model(),
        "weird one": reference_model(),
        name: reference_model(),
    }
    modeld.write_config()
    modeld.call("Reload")
    modeld.load(name)
    unit = modeld.prop(name, "Unit")
    assert modeld.scopes() == [unit]
    assert modeld.unit_pids(unit)
    assert modeld.prop(name, "State") == "ready"
    modeld.unload(name)
    assert modeld.leftovers(name) == []


async def chaos_client(
    address: str,
    seed: int,
    stop: asyncio.Event,
    replies: list[tuple[Message, bool]],
    restarting: list[bool],
) -> None:
    rng = random.Random(seed)
    async with connect(address) as bus:
        while not stop.is_set():
            name = rng.choice(["fz", "weird one", "nope", "", "fz/..", "x" * 5000])
            member, signature, body = rng.choice(
                [
                    ("Load", "sa{sv}", [name, {"wait": Variant("b", rng.random() < 0.5)}]),
                    ("Unload", "sa{sv}", [name, {"force": Variant("b", True)}]),
                    ("GetModel", "s", [name]),
                    ("ListModels", "", []),
                ]
            )
            during = restarting[0]
            try:
                reply = await asyncio.wait_for(call(bus, member, signature, body), 120)
            except TimeoutError:
                pytest.fail(f"{member}({name!r}) got no reply in 120 s")
            replies.append((reply, during or restarting[0]))


def test_calls_racing_reloads_and_a_restart_get_clean_replies(
    modeld: Modeld, sandbox: Sandbox
) -> None:
    """Eight clients call at random while modeld reloads five times and restarts once."""
    modeld.models = {"fz": reference_model(), "weird one": reference_model()}
    modeld.write_config()
    replies: list[tuple[Message, bool]] = []
    restarting = [False]

    async def run() -> None:
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(chaos_client(sandbox.bus_address, i, stop, replies, restarting))
            for i in range(8)
        ]
        async with connect(sandbox.bus_address) as bus:
            for _ in range(5):
                check(await call(bus, "Reload"))
                await asyncio.sleep(0.2)
        restarting[0] = True
        await asyncio.to_thread(sandbox.systemctl, "restart", "modeld.service")
        await asyncio.sleep(1.0)  # calls made right after the restart, by the same clients
        restarting[0] = False
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)

    asyncio.run(run())
    assert len(replies) > 50
    for reply, during_restart in replies:
        check(reply, restarting=during_restart)
    settle(modeld)
