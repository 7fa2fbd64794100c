"""The commands that talk to modeld over D-Bus (status, list, load, unload, pin, ...)."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from modeld.cli import render
from modeld.cli.client import Client, ModelRef, ModelWatch
from modeld.cli.errors import LOAD_FAILED, CliError
from modeld.errors import NoSuchModel
from modeld.naming import MODEL_INTERFACE

SERVING = frozenset({"ready", "busy"})
# Replies to GetAll on a model path that a concurrent Reload removed.
_GONE = frozenset(
    {
        NoSuchModel.dbus_name,
        "org.freedesktop.DBus.Error.UnknownObject",
        "org.freedesktop.DBus.Error.UnknownInterface",
        "org.freedesktop.DBus.Error.UnknownMethod",
    }
)


def say(line: str) -> None:
    """One line of human output, flushed at once (progress must show as it happens)."""
    print(line, flush=True)


async def run(args: argparse.Namespace) -> int:
    client = await Client.connect(user=args.user)
    try:
        return await COMMANDS[args.command](client, args)
    finally:
        await client.close()


async def _properties(client: Client, refs: list[ModelRef]) -> list[dict[str, Any]]:
    """Model properties for each row, fetched concurrently.

    A model that vanished between ListModels and GetAll (a concurrent Reload) keeps the
    columns ListModels gave.
    """

    async def one(ref: ModelRef) -> dict[str, Any]:
        base = {"Name": ref.name, "State": ref.state, "Backend": ref.backend}
        try:
            props = await client.model_properties(ref.path)
        except CliError as err:
            if err.name in _GONE:
                return base
            raise
        return {**base, **props}

    return list(await asyncio.gather(*(one(ref) for ref in refs)))


def _pid_suffix(props: Mapping[str, Any], elapsed_ms: int | None = None) -> str:
    parts = []
    if props.get("MainPID"):
        parts.append(f"pid {props['MainPID']}")
    if elapsed_ms is not None:
        parts.append(f"{elapsed_ms} ms")
    return f" ({', '.join(parts)})" if parts else ""


# -- status / list ---------------------------------------------------------------------


async def cmd_status(client: Client, args: argparse.Namespace) -> int:
    manager, refs = await asyncio.gather(client.manager_properties(), client.list_models())
    active = [ref for ref in refs if ref.state != "unloaded"]
    props = await _properties(client, active)
    if args.json:
        out = render.json_props(manager, render.MANAGER_KEYS)
        out["models"] = [render.model_json(r.path, p) for r, p in zip(active, props, strict=True)]
        render.dump_json(out)
        return 0

    loaded = int(manager.get("LoadedCount", len(active)))
    max_loaded = int(manager.get("MaxLoaded", 0))
    used = int(manager.get("MemoryUsed", 0))
    budget = int(manager.get("MemoryBudget", 0))
    say(f"Version:  {manager.get('Version', '?')}")
    say(f"Loaded:   {loaded} of {max_loaded}" if max_loaded else f"Loaded:   {loaded} (no limit)")
    say(
        f"Memory:   {render.human_bytes(used)} of {render.human_bytes(budget)} budget"
        if budget
        else f"Memory:   {render.human_bytes(used)} (no budget)"
    )
    say("")
    if not active:
        say("No models loaded.")
        return 0
    rows = [
        [
            p.get("Name", ""),
            p.get("State", ""),
            p.get("Backend", ""),
            str(p.get("MainPID") or "-"),
            render.memory_cell(int(p.get("MemoryCurrent", 0)), int(p.get("MemoryMax", 0))),
            render.size_or_dash(int(p.get("MemoryPeak", 0))),
            render.size_or_dash(int(p.get("GpuMemory", 0))),
            str(p.get("InFlight", 0)),
            render.relative_time(int(p.get("LastUsed", 0))),
            p.get("Endpoint") or "-",
        ]
        for p in props
    ]
    headers = [
        *("NAME", "STATE", "BACKEND", "PID", "MEMORY", "PEAK", "GPU MEM", "IN FLIGHT"),
        "LAST USED",
    ]
    say(render.table([*headers, "ENDPOINT"], rows, right=("PID", "IN FLIGHT")))
    return 0


ERROR_WIDTH = 60


async def cmd_list(client: Client, args: argparse.Namespace) -> int:
    refs = await client.list_models()
    props = await _properties(client, refs)
    if args.json:
        models = [render.model_json(r.path, p) for r, p in zip(refs, props, strict=True)]
        render.dump_json({"models": models})
        return 0
    if not refs:
        say("No models configured.")
        return 0
    any_failed = any(p.get("State") == "failed" for p in props)
    headers = ["NAME", "STATE", "BACKEND", "MEMORY", "PEAK", "PINNED", "LAST USED"]
    rows = []
    for p in props:
        row = [
            p.get("Name", ""),
            p.get("State", ""),
            p.get("Backend", ""),
            render.memory_cell(int(p.get("MemoryCurrent", 0)), int(p.get("MemoryMax", 0))),
            render.size_or_dash(int(p.get("MemoryPeak", 0))),
            "yes" if p.get("Pinned") else "no",
            render.relative_time(int(p.get("LastUsed", 0))),
        ]
        if any_failed:
            error = p.get("LastError", "") if p.get("State") == "failed" else ""
            row.append(render.truncate(error, ERROR_WIDTH) if error else "")
        rows.append(row)
    say(render.table([*headers, "LAST ERROR"] if any_failed else headers, rows))
    return 0


# -- load / unload ---------------------------------------------------------------------


async def cmd_load(client: Client, args: argparse.Namespace) -> int:
    name: str = args.name
    if args.no_wait:
        path = await client.load(name, force=args.force)
        if args.json:
            render.dump_json({"name": name, "path": path})
        else:
            say(f"{name}: load requested ({path})")
        return 0

    # Subscribe before asking for the load so no state change can slip past.
    path, owner = await client.get_model(name)
    watch = await client.watch_model(path, owner)
    try:
        started = time.monotonic()
        await client.load(name, force=args.force)
        # The state right after Load covers a model that was already ready (no signal
        # will come). Signals older than this snapshot are superseded by it.
        props, snapshot = await client.get_all(path, MODEL_INTERFACE)
        return await _follow_load(client, args, name, path, watch, props, snapshot, started)
    finally:
        watch.close()


async def _follow_load(
    client: Client,
    args: argparse.Namespace,
    name: str,
    path: str,
    watch: ModelWatch,
    props: dict[str, Any],
    snapshot: int,
    started: float,
) -> int:
    printed: str | None = None
    seen_loading = False
    while True:
        state = str(props.get("State", ""))
        if state == "loading":
            seen_loading = True
        if state in SERVING or state == "failed":
            # Final: one fresh read for MainPID / LastError (PropertiesChanged may
            # carry only State), keeping the state the signal reported.
            props = {**(await client.model_properties(path)), "State": state}
        if state != printed and (state != "unloaded" or seen_loading) and not args.json:
            elapsed = int((time.monotonic() - started) * 1000)
            say(f"{name}: {state}" + (_pid_suffix(props, elapsed) if state in SERVING else ""))
            printed = state
        if state in SERVING:
            if args.json:
                render.dump_json(render.model_json(path, props))
            return 0
        if state == "failed" or (state == "unloaded" and seen_loading):
            last_error = str(props.get("LastError", ""))
            if state == "failed":
                message = f"{name} failed to load: {last_error or 'no error reported'}"
            else:
                message = f"{name} was unloaded while loading"
                message += f": {last_error}" if last_error else ""
            raise CliError(LOAD_FAILED, message, details={"model": render.model_json(path, props)})
        while True:
            change = await watch.next()
            if change.serial < snapshot:
                continue
            props.update(change.changed)
            if "State" in change.invalidated:
                props = await client.model_properties(path)
            if "State" in change.changed or "State" in change.invalidated:
                break


async def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    await client.unload(args.name, force=args.force)
    if args.json:
        path, _ = await client.get_model(args.name)
        render.dump_json(render.model_json(path, await client.model_properties(path)))
    else:
        say(f"{args.name}: unloaded")
    return 0


async def _set_pinned(client: Client, args: argparse.Namespace, pinned: bool) -> int:
    path, _ = await client.get_model(args.name)
    await client.set_pinned(path, pinned)
    if args.json:
        render.dump_json({"name": args.name, "path": path, "pinned": pinned})
    else:
        say(f"{args.name}: {'pinned' if pinned else 'unpinned'}")
    return 0


async def cmd_pin(client: Client, args: argparse.Namespace) -> int:
    return await _set_pinned(client, args, True)


async def cmd_unpin(client: Client, args: argparse.Namespace) -> int:
    return await _set_pinned(client, args, False)


async def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    await client.reload()
    if args.json:
        render.dump_json({"reloaded": True})
    else:
        say("configuration reloaded")
    return 0


COMMANDS: dict[str, Callable[[Client, argparse.Namespace], Awaitable[int]]] = {
    "status": cmd_status,
    "list": cmd_list,
    "load": cmd_load,
    "unload": cmd_unload,
    "pin": cmd_pin,
    "unpin": cmd_unpin,
    "reload": cmd_reload,
}
