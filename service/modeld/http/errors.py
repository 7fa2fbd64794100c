"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the front door answers is an :class:`ApiError`; this module also decides
which status each of modeld's own errors and each backend failure gets.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from modeld.errors import (
    Busy,
    InCooldown,
    InsufficientResources,
    LoadFailed,
    ModeldError,
    NoSuchBackend,
    NoSuchModel,
    QueueFull,
    SystemdError,
)
from modeld.naming import shown
from modeld.rpc.http2 import RpcFailed

RETRY_AFTER_BUSY = 5
"""Seconds to wait after a load that found the models in its way busy, or a request that
waited ``request_timeout`` in vain."""
RETRY_AFTER_FAILED = 10
"""Seconds to wait after a failed load."""
RETRY_AFTER_NO_ROOM = 30
"""Seconds to wait after a load refused for lack of memory (pinned models in the way)."""

_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error"}


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return _TYPES.get(status, "invalid_request_error")


class ApiError(Exception):
    """A request's failure, answered with ``status`` and OpenAI's error body.

    ``retry_after`` (seconds) becomes a ``Retry-After`` header; ``headers`` are added to
    the response (e.g. ``Allow``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _error_type(self.status),
                "param": self.param,
                "code": self.code,
            }
        }

    def encoded(self) -> bytes:
        return json.dumps(self.body()).encode()

    def response(self) -> web.Response:
        return web.Response(
            body=self.encoded(),
            status=self.status,
            headers=self.headers,
            content_type="application/json",
        )


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def unknown_model(name: str) -> ApiError:
    return ApiError(
        404, f"no model named {shown(name)} is configured", param="model", code="model_not_found"
    )


def waited_too_long(model: str, seconds: float) -> ApiError:
    return ApiError(
        503,
        f"{model} could not be loaded and given a free slot within {seconds:g} s"
        " (request_timeout); retry later",
        code="timeout",
        retry_after=RETRY_AFTER_BUSY,
    )


def internal_error() -> ApiError:
    return ApiError(500, "internal error in modeld (its journal has the details)")


def from_modeld_error(err: ModeldError) -> ApiError:
    """The answer to one of modeld's errors raised while serving a request."""
    if isinstance(err, NoSuchModel):
        return ApiError(404, err.message, param="model", code="model_not_found")
    if isinstance(err, QueueFull):
        return ApiError(429, err.message, code="queue_full", retry_after=err.retry_after)
    if isinstance(err, Busy):
        return ApiError(503, err.message, code="model_busy", retry_after=RETRY_AFTER_BUSY)
    if isinstance(err, InsufficientResources):
        return ApiError(
            503, err.message, code="insufficient_resources", retry_after=RETRY_AFTER_NO_ROOM
        )
    if isinstance(err, InCooldown):
        return ApiError(503, err.message, code="load_failed", retry_after=err.retry_after)
    if isinstance(err, LoadFailed | SystemdError):
        return ApiError(503, err.message, code="load_failed", retry_after=RETRY_AFTER_FAILED)
    if isinstance(err, NoSuchBackend):
        return ApiError(500, err.message, code="backend_not_installed")
    return ApiError(500, err.message)


def from_rpc_error(err: RpcFailed) -> ApiError:
    """The answer to a backend call that failed."""
    return ApiError(502, f"backend error: {err.details or err.code.name}", code="backend_error")


def backend_nonsense(what: str) -> ApiError:
    """The backend answered something no client can use (a NaN embedding)."""
    return ApiError(502, f"backend error: {what}", code="backend_error")


def backend_gone(model: str) -> ApiError:
    """The backend went away between the request getting its slot and calling it."""
    return ApiError(
        502,
        f"backend error: {model}'s backend went away before it got the request",
        code="backend_error",
    )


def from_http_exception(exc: web.HTTPException, request: web.Request) -> ApiError:
    """aiohttp's own refusals (no such route, wrong method, body too large...)."""
    status = exc.status
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    if status == 404:
        message = f"no route {request.method} {request.path}"
        return ApiError(404, message, code="unknown_route")
    if status == 405:
        message = f"{request.path} does not accept {request.method}"
        return ApiError(405, message, code="method_not_allowed", headers=headers)
    return ApiError(status, exc.reason or exc.text or "request refused", headers=headers)
