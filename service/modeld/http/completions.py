"""``POST /v1/completions`` (OpenAI request and response shape, not streaming).

The request is served through the supervisor's request accounting: it counts as in flight
from the moment it is accepted (the model is then neither evicted nor idle), the model is
loaded on demand, and at most ``parallel`` requests reach the backend at once.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import grpc.aio
from aiohttp import web

from modeld.errors import (
    Busy,
    InsufficientResources,
    LoadFailed,
    ModeldError,
    NoSuchModel,
    QueueFull,
)
from modeld.rpc import backend_pb2
from modeld.supervisor.registry import Supervisor

DEFAULT_MAX_TOKENS = 16


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_response(
    status: int, message: str, kind: str, *, retry_after: int | None = None, **extra: Any
) -> web.Response:
    if retry_after is None and status == 503:
        retry_after = 1
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    body = {"error": {"message": message, "type": kind, **extra}}
    return web.json_response(body, status=status, headers=headers)


def _number(body: dict[str, Any], key: str, kind: type, default: Any, low: float) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"{key} must be a number", key)
    if kind is int and not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer", key)
    if value < low:
        raise BadRequest(f"{key} must be at least {low:g}", key)
    return kind(value)


def parse_request(body: Any) -> tuple[str, backend_pb2.PredictOptions, int]:
    """Validate an OpenAI completion request: (model, PredictOptions, max_tokens)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required", "model")
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string", "prompt")
    if body.get("stream"):
        raise BadRequest("streaming is not supported on this endpoint yet", "stream")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop must be a string or a list of strings", "stop")
    max_tokens = _number(body, "max_tokens", int, DEFAULT_MAX_TOKENS, 1)
    options = backend_pb2.PredictOptions(
        Prompt=prompt,
        Tokens=max_tokens,
        Temperature=_number(body, "temperature", float, 1.0, 0),
        TopP=_number(body, "top_p", float, 1.0, 0),
        Seed=_number(body, "seed", int, 0, 0),
        StopPrompts=stop,
    )
    return model, options, max_tokens


async def completions(request: web.Request, supervisor: Supervisor) -> web.Response:
    try:
        body = await request.json()
        model, options, max_tokens = parse_request(body)
    except ValueError:
        return error_response(400, "the request body is not valid JSON", "invalid_request_error")
    except BadRequest as err:
        return error_response(400, str(err), "invalid_request_error", param=err.param)
    try:
        async with supervisor.serving(model) as ticket:
            client = await ticket.client()
            reply = await client.stub.Predict(options)
    except NoSuchModel as err:
        return error_response(404, err.message, "invalid_request_error", code="model_not_found")
    except QueueFull as err:
        return error_response(
            429, err.message, "rate_limit_error", code="queue_full", retry_after=err.retry_after
        )
    except (Busy, InsufficientResources, LoadFailed) as err:
        return error_response(503, err.message, "server_error", code=type(err).__name__)
    except ModeldError as err:
        return error_response(500, err.message, "server_error")
    except grpc.aio.AioRpcError as err:
        return error_response(
            502, f"backend error: {err.details() or err.code().name}", "server_error"
        )
    completion_tokens = int(reply.tokens)
    return web.json_response(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "text": reply.message.decode(errors="replace"),
                    "logprobs": None,
                    "finish_reason": "length" if completion_tokens >= max_tokens else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": int(reply.prompt_tokens),
                "completion_tokens": completion_tokens,
                "total_tokens": int(reply.prompt_tokens) + completion_tokens,
            },
        }
    )
