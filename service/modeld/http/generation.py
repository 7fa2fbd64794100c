"""Serving one OpenAI request through the supervisor and a backend.

Every request takes its place in the model's queue (:meth:`Supervisor.serving`), loads the
model on demand and waits for a ``parallel`` slot (:meth:`Ticket.client`), at most
``request_timeout``, then calls the backend. Leaving, in any way (an answer, an error, the
client going away and the handler being cancelled), frees the place and the slot and
cancels the backend call.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

from aiohttp import web

from modeld.errors import ModeldError, NoSuchModel
from modeld.http.errors import (
    ApiError,
    backend_gone,
    backend_nonsense,
    from_modeld_error,
    from_rpc_error,
    internal_error,
    unknown_model,
    waited_too_long,
)
from modeld.http.instrumentation import CLIENT_CLOSED, Exchange, RequestMetrics
from modeld.http.openai_requests import Embeddings, Generation
from modeld.http.openai_responses import ResponseFormat, embeddings_body, finish_reason
from modeld.http.sse import EventStream, await_with_comments
from modeld.rpc import backend_pb2
from modeld.rpc.client import BackendClient, BackendGone, ReplyStream
from modeld.rpc.http2 import RpcFailed, StatusCode
from modeld.supervisor.registry import Supervisor, Ticket

log = logging.getLogger(__name__)

LOADING_GRACE = 0.25
"""Seconds a stream waits for its model before it sends its headers and a first comment."""
LOADING_INTERVAL = 1.0
"""Seconds between comments while a stream waits (clients are promised at most 2 s)."""


class Gateway:
    """The way from a parsed request to the backend of its model."""

    def __init__(self, supervisor: Supervisor, metrics: RequestMetrics) -> None:
        self.supervisor = supervisor
        self.metrics = metrics

    def request_timeout(self) -> float | None:
        return self.supervisor.config.daemon.request_timeout or None

    @contextlib.asynccontextmanager
    async def serving(self, exchange: Exchange, model: str) -> AsyncIterator[Ticket]:
        """:meth:`Supervisor.serving`, with modeld's and the backend's errors as ApiErrors."""
        try:
            self.supervisor.owner(model)
        except NoSuchModel:
            raise unknown_model(model) from None
        exchange.model = model
        try:
            async with self.supervisor.serving(model) as ticket:
                yield ticket
        except ModeldError as err:
            raise from_modeld_error(err) from None
        except RpcFailed as err:
            raise from_rpc_error(err) from None
        except BackendGone:
            raise backend_gone(model) from None

    async def client(self, ticket: Ticket, model: str) -> BackendClient:
        """The backend's client once the model is loaded and a slot is ours."""
        timeout = self.request_timeout()
        if timeout is None:
            return await ticket.client()
        try:
            async with asyncio.timeout(timeout):
                return await ticket.client()
        except TimeoutError:
            raise waited_too_long(model, timeout) from None

    # ---------------------------------------------------------------- generation

    async def generate(
        self, exchange: Exchange, request: Generation, answer: ResponseFormat
    ) -> web.Response:
        """A non-streamed completion or chat answer."""
        async with self.serving(exchange, request.model) as ticket:
            client = await self.client(ticket, request.model)
            reply = await client.predict(request.options)
        tokens = reply.tokens
        text = reply.message.decode("utf-8", errors="replace")
        finish = finish_reason(tokens, request.max_tokens)
        return web.json_response(answer.whole(text, finish, reply.prompt_tokens, tokens))

    async def stream(
        self,
        http_request: web.Request,
        exchange: Exchange,
        request: Generation,
        answer: ResponseFormat,
    ) -> web.StreamResponse:
        """A streamed answer: loading comments while it waits, then one event per piece.

        A failure before the stream opened is raised (answered with its status); after,
        it ends the stream with an error event.
        """
        events = EventStream(http_request)
        try:
            await self._stream(exchange, request, answer, events)
        finally:
            events.close()
        return events.response

    async def _stream(
        self, exchange: Exchange, request: Generation, answer: ResponseFormat, events: EventStream
    ) -> None:
        try:
            async with self.serving(exchange, request.model) as ticket:
                stream, first = await self._first_replies(exchange, ticket, request, events)
                try:
                    await self._relay(exchange, stream, first, request, answer, events)
                finally:
                    stream.cancel()
        except ConnectionError:
            exchange.status = CLIENT_CLOSED
        except Exception as err:
            if not events.opened:
                raise
            if not isinstance(err, ApiError):
                log.exception("error in a stream of %s", request.model)
                err = internal_error()
            exchange.status = err.status
            with contextlib.suppress(ConnectionError):
                await events.fail(err)

    async def _first_replies(
        self, exchange: Exchange, ticket: Ticket, request: Generation, events: EventStream
    ) -> tuple[ReplyStream, list[backend_pb2.Reply]]:
        model = request.model
        loading = True

        async def start() -> tuple[ReplyStream, list[backend_pb2.Reply]]:
            nonlocal loading
            client = await ticket.client()
            loading = False
            stream = await client.predict_stream(request.options)
            try:
                return stream, await stream.read_batch()
            except BaseException:
                stream.cancel()
                raise

        def comment() -> str:
            doing = f"loading {model}" if loading else f"{model} is reading the prompt"
            return f"{doing} … {exchange.elapsed():.0f} s"

        timeout = self.request_timeout()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return await await_with_comments(
                asyncio.ensure_future(start()),
                events,
                comment,
                grace=LOADING_GRACE,
                interval=LOADING_INTERVAL,
                deadline=lambda: deadline if loading else None,
            )
        except TimeoutError:
            raise waited_too_long(model, timeout or 0) from None

    async def _relay(
        self,
        exchange: Exchange,
        stream: ReplyStream,
        replies: list[backend_pb2.Reply],
        request: Generation,
        answer: ResponseFormat,
        events: EventStream,
    ) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        prompt_tokens = tokens = 0
        waiting_for_first = True
        opening = answer.opening()
        if opening is not None:
            await events.event(opening)
        while replies:
            for reply in replies:
                if waiting_for_first and reply.message:
                    waiting_for_first = False
                    self.metrics.first_token(exchange.model, exchange.route, exchange.elapsed())
                prompt_tokens = reply.prompt_tokens or prompt_tokens
                tokens += reply.tokens or (1 if reply.message else 0)
                text = decoder.decode(reply.message)
                if text:
                    await events.event(answer.piece(text))
            replies = await stream.read_batch()
        rest = decoder.decode(b"", final=True)
        if rest:
            await events.event(answer.piece(rest))
        await events.event(answer.closing(finish_reason(tokens, request.max_tokens)))
        usage = answer.usage_chunk(prompt_tokens, tokens)
        if usage is not None:
            await events.event(usage)
        await events.finish()

    # ---------------------------------------------------------------- embeddings

    async def embed(self, exchange: Exchange, request: Embeddings) -> web.Response:
        """One Embedding call per input, in order, holding one slot."""
        vectors = []
        prompt_tokens = 0
        async with self.serving(exchange, request.model) as ticket:
            client = await self.client(ticket, request.model)
            for text in request.inputs:
                result = await client.embedding(backend_pb2.PredictOptions(Embeddings=text))
                if not all(math.isfinite(value) for value in result.embeddings):
                    raise backend_nonsense("an embedding that is not finite (NaN or infinity)")
                vectors.append(result.embeddings)
                prompt_tokens += await _count_tokens(client, text)
        return web.json_response(
            embeddings_body(request.model, vectors, prompt_tokens, request.base64)
        )


async def _count_tokens(client: BackendClient, text: str) -> int:
    """Tokens in ``text`` by the backend's tokenizer (0 if it has none)."""
    try:
        result = await client.tokenize(backend_pb2.PredictOptions(Prompt=text))
    except RpcFailed as err:
        if err.code is StatusCode.UNIMPLEMENTED:
            return 0
        raise
    return max(0, int(result.length))
