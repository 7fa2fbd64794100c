"""A lease (Acquire) is use, not work, tried as a user would with real systemd and D-Bus:
it outlives busy_timeout without the backend being killed, and blocks an unforced eviction
until it is closed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from busclient import SignalRecorder, call, connect
from dbus_next.signature import Variant
from sandbox import Sandbox
from sandbox.deploy import Modeld, deploy, reference_model

pytestmark = pytest.mark.systemd

BUSY_3S = 'busy_timeout = "3s"\n'


@pytest.fixture(scope="module")
def modeld(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Modeld]:
    deployment = deploy(
        sandbox,
        tmp_path_factory.mktemp("modeld-leases"),
        {
            "held": reference_model(extra=BUSY_3S),
            "clock": reference_model(options=("predict_delay=60",), extra=BUSY_3S),
            "other": reference_model(),
        },
        daemon='eviction_retries = 2\neviction_retry_interval = "0.5s"\n',
    )
    yield deployment
    deployment.stop()
    sandbox.remove_units(["modeld.service", "modeld.socket", "modeld.slice"])


def test_a_lease_outlives_busy_timeout_and_blocks_unforced_eviction_until_closed(
    modeld: Modeld,
) -> None:
    """The clock: a request on ``clock`` (same busy_timeout) that starts after the lease;
    when modeld kills it for busy-timeout, the lease is older than the busy timeout."""
    modeld.load("clock")

    async def scenario() -> None:
        async with connect(modeld.sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()
            reply = await call(bus, "Acquire", "sa{sv}", ["held", {}])
            assert reply.error_name is None, reply.body
            lease_fd = reply.unix_fds[reply.body[1]]
            request = asyncio.create_task(
                asyncio.to_thread(
                    modeld.http_post,
                    "/v1/completions",
                    {"model": "clock", "prompt": "The sea", "max_tokens": 2},
                )
            )
            await recorder.wait_for(lambda: recorder.unloaded("clock"), 30)
            assert recorder.unloaded("clock") == ["busy-timeout"]
            status, _ = await request
            assert status == 502  # the killed backend's request fails, the lease holds
            assert recorder.unloaded("held") == []
            assert modeld.prop("held", "State") == "busy"

            modeld.sandbox.busctl(
                "set-property", "org.modeld1", "/org/modeld1", "org.modeld1.Manager",
                "MaxLoaded", "u", "1",
            )  # fmt: skip
            options = {"wait": Variant("b", True)}
            refused = await call(bus, "Load", "sa{sv}", ["other", options])
            assert refused.error_name == "org.modeld1.Error.Busy"
            assert "held" in refused.body[0]
            assert modeld.prop("held", "State") == "busy"

            os.close(lease_fd)
            loaded = await call(bus, "Load", "sa{sv}", ["other", options])
            assert loaded.error_name is None, loaded.body
            assert recorder.unloaded("held") == ["lru"]

    try:
        asyncio.run(scenario())
    finally:
        modeld.sandbox.busctl(
            "set-property", "org.modeld1", "/org/modeld1", "org.modeld1.Manager",
            "MaxLoaded", "u", "0",
        )  # fmt: skip
    for name in ("held", "clock", "other"):
        modeld.unload(name, force=True)
    assert modeld.scopes() == []
