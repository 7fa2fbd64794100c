"""Reading and validating OpenAI requests (pure, apart from reading the body).

Parameters modeld uses are checked (a wrong type or a value out of range is a 400 naming
the parameter) and mapped onto ``PredictOptions``; parameters it does not support are
ignored, as OpenAI-compatible servers do, except ``n`` > 1 and inputs it cannot pass on
(token arrays, non-text content), which are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from modeld.http.errors import ApiError, bad_request
from modeld.rpc import backend_pb2

MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest request body accepted (413 beyond)."""
DEFAULT_COMPLETION_TOKENS = 16
"""``max_tokens`` of a completion that does not say (OpenAI's default); a chat without it
is left to the backend's own limit."""
MAX_EMBEDDING_INPUTS = 2048
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

Body = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Generation:
    """A completion or chat request, ready for the backend."""

    model: str
    options: backend_pb2.PredictOptions
    max_tokens: int | None
    """The limit asked for (None: the backend's own), which tells "length" from "stop"."""
    stream: bool
    include_usage: bool
    """Streamed: end with a chunk carrying the usage (``stream_options.include_usage``)."""


@dataclass(frozen=True, slots=True)
class Embeddings:
    """An embeddings request: one backend call per input."""

    model: str
    inputs: tuple[str, ...]
    base64: bool
    """``encoding_format: "base64"``: vectors as base64 of little-endian float32."""


async def read_json_body(request: web.Request, limit: int = MAX_BODY_BYTES) -> Body:
    """The request's body as a JSON object, whatever its Content-Type says."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    return decode_json_object(raw)


def too_large(limit: int) -> ApiError:
    return ApiError(
        413, f"the request body is larger than {limit // (1024 * 1024)} MiB", code="too_large"
    )


def decode_json_object(raw: bytes) -> Body:
    """Parse a request body: UTF-8 JSON holding an object."""
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad_request(f"the request body is not valid UTF-8 (byte {err.start})") from None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad_request(
            f"the request body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
        ) from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


# ------------------------------------------------------------------------- fields


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def text(value: object, param: str) -> str:
    """A string that can be sent on (no lone surrogates from ``\\udXXX`` escapes)."""
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a string, not {_kind(value)}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad_request(
            f"{param} is not valid Unicode (a lone surrogate at character {err.start})", param
        ) from None
    return value


def model_name(body: Body) -> str:
    value = body.get("model")
    if value is None:
        raise bad_request("model is required", "model")
    name = text(value, "model")
    if not name:
        raise bad_request("model must not be empty", "model")
    return name


def number(body: Body, param: str, low: float, high: float) -> float | None:
    """An optional finite number within [low, high] (None when absent or null)."""
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{param} must be a number, not {_kind(value)}", param)
    if not math.isfinite(value) or not low <= value <= high:
        raise bad_request(f"{param} must be between {low:g} and {high:g} (got {value})", param)
    return float(value)


def integer(body: Body, param: str, low: int, high: int) -> int | None:
    """An optional integer within [low, high] (None when absent or null); 3.0 counts."""
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{param} must be an integer, not {_kind(value)}", param)
    if not low <= value <= high:
        raise bad_request(f"{param} must be between {low} and {high} (got {value})", param)
    return value


def flag(body: Body, param: str) -> bool:
    value = body.get(param)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{param} must be true or false, not {_kind(value)}", param)
    return value


def stop_strings(body: Body) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        return [text(value, "stop")] if value else []
    if not isinstance(value, list):
        problem = f"stop must be a string or an array of strings, not {_kind(value)}"
        raise bad_request(problem, "stop")
    return [text(item, f"stop[{i}]") for i, item in enumerate(value) if item != ""]


def _include_usage(body: Body) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request(
            f"stream_options must be an object, not {_kind(options)}", "stream_options"
        )
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        param = "stream_options.include_usage"
        raise bad_request(f"{param} must be true or false, not {_kind(value)}", param)
    return bool(value)


def _one_choice(body: Body) -> None:
    n = integer(body, "n", 1, INT32_MAX)
    if n is not None and n != 1:
        raise bad_request("n: only one choice per request is supported (n = 1)", "n")


def sampling(body: Body, max_tokens: int | None) -> backend_pb2.PredictOptions:
    """PredictOptions with the sampling parameters common to completions and chats."""
    _one_choice(body)
    temperature = number(body, "temperature", 0, 2)
    top_p = number(body, "top_p", 0, 1)
    return backend_pb2.PredictOptions(
        Tokens=max_tokens or 0,
        Temperature=1.0 if temperature is None else temperature,
        TopP=1.0 if top_p is None else top_p,
        TopK=integer(body, "top_k", 0, INT32_MAX) or 0,
        Seed=integer(body, "seed", INT32_MIN, INT32_MAX) or 0,
        PresencePenalty=number(body, "presence_penalty", -2, 2) or 0.0,
        FrequencyPenalty=number(body, "frequency_penalty", -2, 2) or 0.0,
        StopPrompts=stop_strings(body),
    )


def _stream(body: Body) -> tuple[bool, bool]:
    stream = flag(body, "stream")
    return stream, _include_usage(body) if stream else False


# -------------------------------------------------------------------- requests


def parse_completion(body: Body) -> Generation:
    """``POST /v1/completions``: one prompt (a string, or an array of one string)."""
    model = model_name(body)
    prompt = body.get("prompt", "")
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad_request("prompt: exactly one prompt per request is supported", "prompt")
        if not isinstance(prompt[0], str):
            raise bad_request("prompt: token arrays are not supported; send text", "prompt")
        prompt = prompt[0]
    max_tokens = integer(body, "max_tokens", 1, INT32_MAX) or DEFAULT_COMPLETION_TOKENS
    options = sampling(body, max_tokens)
    options.Prompt = text(prompt, "prompt")
    stream, include_usage = _stream(body)
    return Generation(model, options, max_tokens, stream, include_usage)


def parse_chat(body: Body) -> Generation:
    """``POST /v1/chat/completions``: the messages go to the backend as ``Messages``, for it
    to apply its chat template (``UseTokenizerTemplate``)."""
    model = model_name(body)
    messages = chat_messages(body.get("messages"))
    max_tokens = integer(body, "max_completion_tokens", 1, INT32_MAX)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", 1, INT32_MAX)
    options = sampling(body, max_tokens)
    options.Messages.extend(messages)
    options.UseTokenizerTemplate = True
    stream, include_usage = _stream(body)
    return Generation(model, options, max_tokens, stream, include_usage)


def chat_messages(value: object) -> list[backend_pb2.Message]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages must be a non-empty array of messages", "messages")
    messages = []
    for i, item in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{param} must be an object, not {_kind(item)}", param)
        role = item.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise bad_request(
                f"{param}.role must be one of {', '.join(sorted(CHAT_ROLES))}", f"{param}.role"
            )
        message = backend_pb2.Message(
            role=role, content=_content(item.get("content"), f"{param}.content")
        )
        for key in ("name", "tool_call_id"):
            if item.get(key) is not None:
                setattr(message, key, text(item[key], f"{param}.{key}"))
        if item.get("tool_calls") is not None:
            message.tool_calls = json.dumps(item["tool_calls"])
        messages.append(message)
    return messages


def _content(value: object, param: str) -> str:
    """A message's content: a string, null, or an array of text parts (joined)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return text(value, param)
    if not isinstance(value, list):
        raise bad_request(f"{param} must be a string or an array of parts", param)
    parts = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or part.get("type") != "text":
            raise bad_request(f"{where}: only text parts are supported", where)
        parts.append(text(part.get("text"), f"{where}.text"))
    return "\n".join(parts)


def parse_embeddings(body: Body) -> Embeddings:
    """``POST /v1/embeddings``: ``input`` is a string or an array of strings."""
    model = model_name(body)
    value = body.get("input")
    if isinstance(value, str):
        inputs: list[object] = [value]
        params = ["input"]
    elif isinstance(value, list) and value:
        if len(value) > MAX_EMBEDDING_INPUTS:
            raise bad_request(f"input: at most {MAX_EMBEDDING_INPUTS} inputs per request", "input")
        inputs = value
        params = [f"input[{i}]" for i in range(len(value))]
    else:
        raise bad_request("input must be a string or a non-empty array of strings", "input")
    for item, param in zip(inputs, params, strict=True):
        if isinstance(item, int | list) and not isinstance(item, bool):
            raise bad_request("input: token arrays are not supported; send text", "input")
        if text(item, param) == "":
            raise bad_request(f"{param} must not be empty", param)
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise bad_request('encoding_format must be "float" or "base64"', "encoding_format")
    return Embeddings(model, tuple(str(i) for i in inputs), encoding == "base64")
