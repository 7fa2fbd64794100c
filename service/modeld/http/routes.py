"""The OpenAI routes: each reads its request, serves it through the :class:`Gateway` and
reports how it ended to the :class:`RequestMetrics`.

Handlers are closures over their objects rather than app keys, so the app also runs on
the aiohttp of Debian 12 (3.8), which has no ``web.AppKey``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from modeld.errors import NoSuchModel
from modeld.http.disconnect import DisconnectWatch
from modeld.http.errors import ApiError, unknown_model
from modeld.http.generation import Gateway
from modeld.http.instrumentation import CLIENT_CLOSED, Exchange, RequestMetrics
from modeld.http.openai_requests import (
    Generation,
    parse_chat,
    parse_completion,
    parse_embeddings,
    read_json_body,
)
from modeld.http.openai_responses import (
    ChatFormat,
    CompletionFormat,
    ResponseFormat,
    model_card,
)
from modeld.supervisor.registry import Supervisor

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = Callable[[web.Request, Exchange], Awaitable[web.StreamResponse]]


class OpenAIRoutes:
    """``/v1/models[/{id}]``, ``/v1/completions``, ``/v1/chat/completions``, ``/v1/embeddings``.

    ``watch_disconnects``: watch each request's connection and cancel its handler when the
    client goes away (for an aiohttp that does not do it itself).
    """

    def __init__(
        self, supervisor: Supervisor, metrics: RequestMetrics, *, watch_disconnects: bool
    ) -> None:
        self._supervisor = supervisor
        self._metrics = metrics
        self._gateway = Gateway(supervisor, metrics)
        self._watch = watch_disconnects

    def register(self, router: web.UrlDispatcher) -> None:
        routes: list[tuple[str, str, Route]] = [
            ("GET", "/v1/models", self.list_models),
            ("GET", "/v1/models/{id}", self.get_model),
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/embeddings", self.embeddings),
        ]
        for method, path, route in routes:
            handler = self._instrumented(path, route)
            if method == "GET":
                router.add_get(path, handler)
            else:
                router.add_route(method, path, handler)

    def _instrumented(self, path: str, route: Route) -> Handler:
        """``route`` answering errors in OpenAI's shape and reporting to the metrics."""

        async def handle(request: web.Request) -> web.StreamResponse:
            exchange = Exchange(path)
            status = CLIENT_CLOSED
            watch = DisconnectWatch(request) if self._watch else None
            try:
                response = await route(request, exchange)
                status = exchange.status or response.status
                return response
            except ApiError as err:
                status = err.status
                return err.response()
            except Exception:
                status = 500
                raise
            finally:
                if watch is not None:
                    watch.close()
                self._report(exchange, status)

        return handle

    def _report(self, exchange: Exchange, status: int) -> None:
        try:
            self._metrics.request_finished(
                exchange.model, exchange.route, status, exchange.elapsed()
            )
        except Exception:
            log.exception("the request metrics failed")

    # ------------------------------------------------------------------- routes

    async def list_models(self, request: web.Request, exchange: Exchange) -> web.Response:
        cards = [model_card(owner) for owner in self._supervisor.owners()]
        return web.json_response({"object": "list", "data": cards})

    async def get_model(self, request: web.Request, exchange: Exchange) -> web.Response:
        name = request.match_info["id"]
        try:
            owner = self._supervisor.owner(name)
        except NoSuchModel:
            raise unknown_model(name) from None
        exchange.model = name
        return web.json_response(model_card(owner))

    async def completions(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        generation = parse_completion(await read_json_body(request))
        answer = CompletionFormat(generation.model, generation.include_usage)
        return await self._generate(request, exchange, generation, answer)

    async def chat_completions(
        self, request: web.Request, exchange: Exchange
    ) -> web.StreamResponse:
        generation = parse_chat(await read_json_body(request))
        answer = ChatFormat(generation.model, generation.include_usage)
        return await self._generate(request, exchange, generation, answer)

    async def _generate(
        self,
        request: web.Request,
        exchange: Exchange,
        generation: Generation,
        answer: ResponseFormat,
    ) -> web.StreamResponse:
        if generation.stream:
            return await self._gateway.stream(request, exchange, generation, answer)
        return await self._gateway.generate(exchange, generation, answer)

    async def embeddings(self, request: web.Request, exchange: Exchange) -> web.Response:
        return await self._gateway.embed(exchange, parse_embeddings(await read_json_body(request)))
