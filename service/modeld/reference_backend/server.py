"""Process entry point of the reference backend (see :mod:`modeld.backend_kit.server`)."""

from __future__ import annotations

import sys

from modeld.backend_kit.server import ProcessControl, serve
from modeld.reference_backend.knobs import KnobError, parse_knobs


def split_knob_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """``--knob key=value`` (or ``--knob=key=value``) arguments apart from the others."""
    knobs: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--knob":
            knobs.append(next(args, ""))
        elif arg.startswith("--knob="):
            knobs.append(arg.removeprefix("--knob="))
        else:
            rest.append(arg)
    return knobs, rest


def main(argv: list[str] | None = None) -> int:
    """Serve the reference backend on ``--addr`` until SIGTERM (see ``serve``).

    ``--knob key=value`` (repeatable) sets test knobs from the start, before any LoadModel
    (a backend directory's run.sh may add them: a backend that is never healthy).
    """
    knob_args, rest = split_knob_args(sys.argv[1:] if argv is None else argv)
    try:
        startup = parse_knobs(knob_args)
    except KnobError as err:
        print(f"reference-backend: --knob: {err}", file=sys.stderr)
        return 2

    def servicer(control: ProcessControl) -> object:
        from modeld.reference_backend.servicer import ReferenceBackend

        return ReferenceBackend(control, startup)

    return serve(
        rest,
        name="reference-backend",
        prog="python -m modeld.reference_backend",
        description="modeld's reference backend: an n-gram model served over gRPC.",
        make_servicer=servicer,
    )
