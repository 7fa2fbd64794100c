"""The owner's safety net: an internal error never leaves a caller waiting forever."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modeld.config import default_daemon_config, load_model_config
from modeld.errors import LoadFailed
from modeld.supervisor.footprints import FootprintStore
from modeld.supervisor.owner import ModelOwner
from modeld.supervisor.status import StatusChange


class Recorder:
    def __init__(self) -> None:
        self.changes: list[StatusChange] = []

    def on_status_changed(self, change: StatusChange) -> None:
        self.changes.append(change)

    def on_loaded(self, model: str) -> None: ...

    def on_unloaded(self, model: str, reason: str) -> None: ...


def test_an_internal_error_fails_the_request_instead_of_hanging(tmp_path: Path) -> None:
    daemon = default_daemon_config(host_memory=8 * 1024**3)
    model_file = tmp_path / "m.toml"
    model_file.write_text('backend = "reference"\n')
    config = load_model_config(model_file, daemon, host_memory=8 * 1024**3)

    async def scenario() -> None:
        context = SimpleNamespace(footprints=FootprintStore())
        owner = ModelOwner(config, context=context, observer=Recorder())  # type: ignore[arg-type]

        def broken(_message: Any) -> None:
            raise RuntimeError("boom")

        owner._on_load = broken  # type: ignore[method-assign]
        with pytest.raises(LoadFailed, match="internal error in modeld \\(boom\\)"):
            await asyncio.wait_for(owner.request_load(), 5)
        owner.set_pinned(True)  # the owner task survived and still handles messages
        await asyncio.sleep(0.05)
        assert owner.status.pinned
        owner._task.cancel()

    asyncio.run(scenario())
