"""Process entry point of the reference backend (see :mod:`modeld.backend_kit.server`)."""

from __future__ import annotations

from modeld.backend_kit.server import ProcessControl, serve


def _servicer(control: ProcessControl) -> object:
    from modeld.reference_backend.servicer import ReferenceBackend

    return ReferenceBackend(control)


def main(argv: list[str] | None = None) -> int:
    """Serve the reference backend on ``--addr`` until SIGTERM (see ``serve``)."""
    return serve(
        argv,
        name="reference-backend",
        prog="python -m modeld.reference_backend",
        description="modeld's reference backend: an n-gram model served over gRPC.",
        make_servicer=_servicer,
    )
