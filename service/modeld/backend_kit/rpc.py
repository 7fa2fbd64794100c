"""Errors of RPC methods as gRPC statuses, for grpcio's sync servicer API.

A method raises :class:`RpcAbort` for an error the caller should see (its code and
message become the status); anything else is logged with its traceback and becomes
INTERNAL naming the method, never a silent hang or a half-sent stream.
"""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc

from modeld.backend_kit.log import log

_R = TypeVar("_R")


class RpcAbort(Exception):
    """Ends the current RPC with a gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def abort(context: Any, code: Any, message: str) -> NoReturn:
    """End the RPC behind ``context`` with ``code`` (grpcio raises out of ``abort``)."""
    context.abort(code, message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _internal(context: Any, name: str, error: Exception) -> NoReturn:
    log(f"error in {name}: {error!r}\n{traceback.format_exc().rstrip()}")
    abort(context, grpc.StatusCode.INTERNAL, f"{name} failed: {error!r}")


def unary(method: Callable[[Any, Any, Any], _R]) -> Callable[[Any, Any, Any], _R]:
    """Wrap a unary RPC method: RpcAbort → its status, other errors → logged + INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: Any) -> _R:
        try:
            return method(self, request, context)
        except RpcAbort as e:
            abort(context, e.code, e.message)
        except Exception as e:
            _internal(context, method.__name__, e)

    return wrapper


def streaming(
    method: Callable[[Any, Any, Any], Iterator[_R]],
) -> Callable[[Any, Any, Any], Iterator[_R]]:
    """Wrap a server-streaming RPC method (a generator) the way :func:`unary` does."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: Any) -> Iterator[_R]:
        try:
            yield from method(self, request, context)
        except RpcAbort as e:
            abort(context, e.code, e.message)
        except Exception as e:
            _internal(context, method.__name__, e)

    return wrapper
