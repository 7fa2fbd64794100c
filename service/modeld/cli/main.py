"""modeldctl: control modeld over D-Bus.

Exit status: 0 on success, 1 when modeld (or the local configuration) reports a failure
or modeld cannot be reached, 2 on a usage error. Only the commands that talk to modeld
import dbus-next.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from modeld.cli.errors import CliError

DAEMON_COMMANDS = frozenset({"status", "list", "load", "unload", "pin", "unpin", "reload"})


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--json/--user, accepted before or after the command name."""
    parser = argparse.ArgumentParser(add_help=False)
    default = False if defaults else argparse.SUPPRESS
    parser.add_argument(
        "--json", action="store_true", default=default, help="machine-readable output"
    )
    parser.add_argument(
        "--user",
        action="store_true",
        default=default,
        help="this user's modeld (session bus, ~/.config/modeld) instead of the system's",
    )
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from modeld import __version__

    common = _common_options(defaults=False)
    parser = argparse.ArgumentParser(
        prog="modeldctl",
        description="Control modeld, the AI model backend supervisor.",
        epilog="See modeldctl(1), modeld(8) and modeld.toml(5).",
        parents=[_common_options(defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"modeldctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, parents=[common])

    add("status", "show modeld's state and the loaded models")
    add("list", "list all configured models")

    p = add("load", "load a model and wait until it is ready")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--no-wait", action="store_true", help="return once the load has been requested")
    p.add_argument("--force", action="store_true", help="evict other models if needed")

    p = add("unload", "unload a model")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="unload even with requests in flight")

    p = add("pin", "keep a model from being evicted")
    p.add_argument("name", metavar="NAME")
    p = add("unpin", "allow a model to be evicted again")
    p.add_argument("name", metavar="NAME")

    add("reload", "make modeld re-read its configuration")

    p = add("logs", "show a model's backend output and modeld's lines about it (journal)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("-n", "--lines", type=_positive_int, metavar="N", help="show the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep showing new lines")

    p = add("backends", "list installed backends and the models using them (local)")
    p.add_argument("--config", metavar="FILE", help="daemon configuration file")

    p = add("config", "configuration commands (local)")
    config_sub = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    c = config_sub.add_parser(
        "check",
        help="validate the configuration and backend references",
        description="validate the configuration and backend references",
        parents=[common],
    )
    c.add_argument("--config", metavar="FILE", help="daemon configuration file")
    return parser


def report(err: CliError, *, as_json: bool) -> None:
    if as_json:
        payload = {"error": {"name": err.name, "message": err.message}, **err.details}
        sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    print(f"modeldctl: {err.message}", file=sys.stderr)


def dispatch(args: argparse.Namespace) -> int:
    if args.command in DAEMON_COMMANDS:
        import asyncio

        from modeld.cli import commands

        return asyncio.run(commands.run(args))

    from modeld.cli import local

    if args.command == "logs":
        return local.cmd_logs(args)
    if args.command == "backends":
        return local.cmd_backends(args)
    if args.command == "config" and args.config_command == "check":
        return local.cmd_config_check(args)
    raise AssertionError(f"unhandled command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except CliError as err:
        report(err, as_json=args.json)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
