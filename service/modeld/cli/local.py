"""Commands that need no daemon: logs, backends, config check."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modeld.cli import render
from modeld.cli.errors import FAILED, INVALID_CONFIG, NO_SUCH_BACKEND, CliError

if TYPE_CHECKING:
    from modeld.config import Config
    from modeld.discovery import Backend, BackendIndex


def cmd_logs(args: argparse.Namespace) -> int:
    """Replace this process with journalctl showing the model's lines: its backend's output
    and what modeld logged about it (both carry the journal field ``MODELD_MODEL``); with
    ``--user``, those of this user's modeld (``journalctl --user``)."""
    match = f"MODELD_MODEL={args.name}"
    argv = ["journalctl", *(["--user"] if args.user else []), match]
    argv += ["-o", "json" if args.json else "short-iso"]
    argv.append("--no-pager")
    if args.lines is not None:
        argv += ["-n", str(args.lines)]
    if args.follow:
        argv.append("-f")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise CliError(FAILED, f"cannot run journalctl: {exc.strerror or exc}") from None
    return 1  # not reached: execvp does not return


def _load(config_file: str | None, *, user: bool) -> tuple[Config, BackendIndex, tuple[Path, ...]]:
    """The configuration modeld would read: the system's, or this user's (``--user``)."""
    import psutil

    from modeld.config import ConfigError, load_config, system_layout, user_layout
    from modeld.discovery import discover_backends, effective_backend_dirs

    try:
        config = load_config(
            Path(config_file) if config_file else None,
            host_memory=psutil.virtual_memory().total,
            layout=user_layout() if user else system_layout(),
        )
    except ConfigError as err:
        raise CliError(INVALID_CONFIG, str(err)) from None
    dirs = effective_backend_dirs(config.daemon.backends_dirs)
    return config, discover_backends(dirs), dirs


def _unresolved(config: Config, index: BackendIndex, dirs: tuple[Path, ...]) -> list[str]:
    searched = ", ".join(str(d) for d in dirs)
    return [
        f"{model.source}: backend: no backend or alias named {model.backend!r} "
        f"(searched {searched})"
        for model in config.models.values()
        if index.resolve(model.backend) is None
    ]


def _unavailable(backends: list[Backend]) -> list[str]:
    return [f"backend {b.name} is unavailable: {b.unavailable}" for b in backends if b.unavailable]


def _unavailable_in_use(config: Config, index: BackendIndex) -> list[str]:
    lines = []
    for model in config.models.values():
        found = index.resolve(model.backend)
        if found is not None and found.unavailable:
            lines.append(f"{model.source}: backend {model.backend} cannot run: {found.unavailable}")
    return lines


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"modeldctl: warning: {line}", file=sys.stderr)


def cmd_backends(args: argparse.Namespace) -> int:
    config, index, dirs = _load(args.config, user=args.user)
    backends = index.all()
    users: dict[int, list[str]] = {i: [] for i in range(len(backends))}
    for model in config.models.values():
        found = index.resolve(model.backend)
        for i, backend in enumerate(backends):
            if found is backend:
                users[i].append(model.name)
    unresolved = _unresolved(config, index, dirs)
    if args.json:
        out: dict[str, Any] = {
            "backends_dirs": [str(d) for d in dirs],
            "backends": [
                {
                    "name": b.name,
                    "alias": b.alias,
                    "meta_backend_for": b.meta_backend_for,
                    "run": str(b.run),
                    "directory": str(b.directory),
                    "origin": str(b.origin),
                    "available": b.unavailable is None,
                    "unavailable": b.unavailable,
                    "models": users[i],
                }
                for i, b in enumerate(backends)
            ],
            "problems": [*index.problems, *unresolved],
        }
        render.dump_json(out)
        return 0
    _warn([*index.problems, *unresolved, *_unavailable(backends)])
    if not backends:
        print("No backends found in " + ", ".join(str(d) for d in dirs))
        return 0
    rows = [
        [
            b.name,
            b.alias or "-",
            b.meta_backend_for or "-",
            "yes" if b.unavailable is None else "no",
            str(b.directory),
            ", ".join(users[i]) or "-",
        ]
        for i, b in enumerate(backends)
    ]
    print(render.table(["NAME", "ALIAS", "META FOR", "AVAILABLE", "PATH", "MODELS"], rows))
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config, index, dirs = _load(args.config, user=args.user)
    unresolved = _unresolved(config, index, dirs)
    if unresolved:
        if not args.json:
            for line in unresolved[:-1]:
                print(f"modeldctl: {line}", file=sys.stderr)
        raise CliError(NO_SUCH_BACKEND, unresolved[-1], details={"problems": unresolved})
    count = len(config.models)
    if args.json:
        render.dump_json(
            {
                "ok": True,
                "source": str(config.source) if config.source else None,
                "models": list(config.models),
                "warnings": [*index.problems, *_unavailable_in_use(config, index)],
            }
        )
        return 0
    _warn([*index.problems, *_unavailable_in_use(config, index)])
    print(f"configuration OK: {count} model{'' if count == 1 else 's'}")
    return 0
