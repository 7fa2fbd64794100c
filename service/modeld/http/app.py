"""HTTP routes: health, the model list and completions (more routes come with the front door)."""

from __future__ import annotations

import socket
from collections.abc import Sequence

from aiohttp import web

from modeld import __version__
from modeld.http.completions import completions
from modeld.supervisor.registry import Supervisor

SUPERVISOR: web.AppKey[Supervisor] = web.AppKey("supervisor", Supervisor)


async def healthz(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    return web.json_response(
        {"status": "ok", "version": __version__, "loaded": supervisor.loaded_count()}
    )


async def list_models(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    data = [
        {
            "id": owner.name,
            "object": "model",
            "owned_by": "modeld",
            "backend": owner.config.backend,
            "state": str(owner.status.state),
        }
        for owner in supervisor.owners()
    ]
    return web.json_response({"object": "list", "data": data})


async def complete(request: web.Request) -> web.Response:
    return await completions(request, request.app[SUPERVISOR])


def build_app(supervisor: Supervisor) -> web.Application:
    app = web.Application()
    app[SUPERVISOR] = supervisor
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", complete)
    return app


class HttpServer:
    """Serves the app on already-listening sockets (inherited or bound by modeld)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._runner = web.AppRunner(build_app(supervisor), access_log=None, handle_signals=False)

    async def start(self, sockets: Sequence[socket.socket]) -> None:
        await self._runner.setup()
        for sock in sockets:
            sock.setblocking(False)
            await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
