"""The HTTP front door: ``/healthz``, ``/metrics`` and the OpenAI routes, on modeld.socket.

Every error, including aiohttp's own (no such route, wrong method), is answered in
OpenAI's error shape; an unexpected exception is logged and answered 500, never with a
traceback or an HTML page.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence

from aiohttp import web

from modeld import __version__
from modeld.http.disconnect import cancellation_option
from modeld.http.errors import from_http_exception, internal_error
from modeld.http.instrumentation import RequestMetrics
from modeld.http.openai_requests import MAX_BODY_BYTES
from modeld.http.routes import Handler, OpenAIRoutes
from modeld.metrics import CONTENT_TYPE, Metrics
from modeld.supervisor.registry import Supervisor

log = logging.getLogger(__name__)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's refusals and unexpected failures as OpenAI errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc, request).response()
    except Exception:
        log.exception("error serving %s %s", request.method, request.path)
        return internal_error().response()


def build_app(
    supervisor: Supervisor,
    metrics: RequestMetrics | None = None,
    *,
    watch_disconnects: bool | None = None,
) -> web.Application:
    """The application; ``metrics`` receives every OpenAI request's outcome, and when it is
    modeld's :class:`Metrics` (a new one over ``supervisor`` if not given) it is served at
    ``/metrics``.

    ``watch_disconnects`` (default: when this aiohttp cannot cancel handlers itself)
    makes the routes watch their connection and cancel themselves when it goes away.
    """

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "version": __version__, "loaded": supervisor.loaded_count()}
        )

    if metrics is None:
        metrics = Metrics(supervisor)
    if watch_disconnects is None:
        watch_disconnects = not cancellation_option()
    app = web.Application(client_max_size=MAX_BODY_BYTES + 1, middlewares=[openai_errors])
    app.router.add_get("/healthz", healthz)
    if isinstance(metrics, Metrics):
        exposition = metrics

        async def scrape(_request: web.Request) -> web.Response:
            body = exposition.exposition()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

        app.router.add_get("/metrics", scrape)
    OpenAIRoutes(supervisor, metrics, watch_disconnects=watch_disconnects).register(app.router)
    return app


class HttpServer:
    """Serves the app on already-listening sockets (inherited or bound by modeld)."""

    def __init__(self, supervisor: Supervisor, metrics: RequestMetrics | None = None) -> None:
        self._runner = web.AppRunner(
            build_app(supervisor, metrics),
            access_log=None,
            handle_signals=False,
            **cancellation_option(),
        )

    async def start(self, sockets: Sequence[socket.socket]) -> None:
        await self._runner.setup()
        for sock in sockets:
            sock.setblocking(False)
            await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
