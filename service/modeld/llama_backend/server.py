"""Process entry point of the llama-cpp backend (see :mod:`modeld.backend_kit.server`)."""

from __future__ import annotations

from modeld.backend_kit.server import ProcessControl, serve


def _servicer(control: ProcessControl) -> object:
    from modeld.llama_backend.servicer import LlamaBackend

    return LlamaBackend(control)


def main(argv: list[str] | None = None) -> int:
    """Serve the llama-cpp backend on ``--addr`` until SIGTERM (see ``serve``)."""
    return serve(
        argv,
        name="llama-cpp-backend",
        prog="python -m modeld.llama_backend",
        description="modeld's llama-cpp backend: GGUF models served by llama.cpp over gRPC.",
        make_servicer=_servicer,
    )
