"""HTTP routes: health, the model list and completions (more routes come with the front door).

Handlers are closures over the supervisor rather than app keys, so the app also runs on the
aiohttp of Debian 12 (3.8), which has no ``web.AppKey``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

from aiohttp import web

from modeld import __version__
from modeld.http.completions import completions
from modeld.metrics import CONTENT_TYPE, Metrics
from modeld.supervisor.registry import Supervisor


def build_app(supervisor: Supervisor, *, metrics: Metrics | None = None) -> web.Application:
    if metrics is None:
        metrics = Metrics(supervisor)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "version": __version__, "loaded": supervisor.loaded_count()}
        )

    async def list_models(_request: web.Request) -> web.Response:
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
        return await completions(request, supervisor)

    async def scrape(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", complete)
    return app


class HttpServer:
    """Serves the app on already-listening sockets (inherited or bound by modeld)."""

    def __init__(self, supervisor: Supervisor, *, metrics: Metrics | None = None) -> None:
        app = build_app(supervisor, metrics=metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def start(self, sockets: Sequence[socket.socket]) -> None:
        await self._runner.setup()
        for sock in sockets:
            sock.setblocking(False)
            await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
