"""OpenAI response bodies: whole answers, stream chunks, embeddings and model cards.

A stream's chunks differ only in their text, so each format encodes the constant parts
of its chunk once and splices the JSON-encoded text in between.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from collections.abc import Sequence
from typing import Any

from modeld.supervisor.owner import ModelOwner

_MARK = "\0"
_ENCODED_MARK = '"\\u0000"'


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object; counts a backend got wrong (negative) count as 0."""
    prompt_tokens, completion_tokens = max(0, prompt_tokens), max(0, completion_tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(completion_tokens: int, max_tokens: int | None) -> str:
    """ "length" when the generation used up ``max_tokens``, else "stop"."""
    return "length" if max_tokens is not None and completion_tokens >= max_tokens else "stop"


class ResponseFormat:
    """The answers of one route for one request: whole, or as stream chunks."""

    id_prefix = ""
    whole_object = ""
    chunk_object = ""

    def __init__(self, model: str, include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self._include_usage = include_usage
        head = {"id": self.id, "object": self.chunk_object, "created": self.created}
        head["model"] = model
        self._chunk_head = _dumps(head)[:-1]
        self._usage_null = ',"usage":null' if include_usage else ""
        head_text, _, tail_text = self._chunk(self._choice(_MARK), None).partition(_ENCODED_MARK)
        self._piece_head, self._piece_tail = head_text.encode(), tail_text.encode()

    def _chunk(self, choice: str | None, usage_json: str | None) -> str:
        choices = "[]" if choice is None else f"[{choice}]"
        tail = self._usage_null if usage_json is None else f',"usage":{usage_json}'
        return f'{self._chunk_head},"choices":{choices}{tail}}}'

    def _choice(self, text: str | None, finish: str | None = None) -> str:
        raise NotImplementedError

    def _whole_choice(self, text: str, finish: str) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, text: str, finish: str, prompt_tokens: int, tokens: int) -> dict[str, Any]:
        """The non-streamed answer."""
        return {
            "id": self.id,
            "object": self.whole_object,
            "created": self.created,
            "model": self.model,
            "choices": [self._whole_choice(text, finish)],
            "usage": usage(prompt_tokens, tokens),
        }

    def opening(self) -> bytes | None:
        """The chunk sent before the first piece of text, if the format has one."""
        return None

    def piece(self, text: str) -> bytes:
        """The chunk carrying a piece of generated text."""
        return self._piece_head + json.dumps(text).encode() + self._piece_tail

    def closing(self, finish: str) -> bytes:
        """The chunk carrying the finish reason."""
        return self._chunk(self._choice(None, finish), None).encode()

    def usage_chunk(self, prompt_tokens: int, tokens: int) -> bytes | None:
        """The last chunk, with the usage, if the request asked for it."""
        if not self._include_usage:
            return None
        return self._chunk(None, _dumps(usage(prompt_tokens, tokens))).encode()


class CompletionFormat(ResponseFormat):
    """``/v1/completions``: ``text_completion`` objects with ``choices[].text``."""

    id_prefix = "cmpl"
    whole_object = chunk_object = "text_completion"

    def _choice(self, text: str | None, finish: str | None = None) -> str:
        return _dumps({"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish})

    def _whole_choice(self, text: str, finish: str) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


class ChatFormat(ResponseFormat):
    """``/v1/chat/completions``: ``chat.completion`` and ``chat.completion.chunk`` objects."""

    id_prefix = "chatcmpl"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _choice(self, text: str | None, finish: str | None = None, role: bool = False) -> str:
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return _dumps({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish})

    def opening(self) -> bytes | None:
        return self._chunk(self._choice("", role=True), None).encode()

    def _whole_choice(self, text: str, finish: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }


def embeddings_body(
    model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int, as_base64: bool
) -> dict[str, Any]:
    """``/v1/embeddings``: one ``embedding`` object per input, in order."""
    data = []
    for index, vector in enumerate(vectors):
        value: list[float] | str = list(vector)
        if as_base64:
            packed = struct.pack(f"<{len(vector)}f", *vector)
            value = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def model_card(owner: ModelOwner) -> dict[str, Any]:
    """A configured model as ``/v1/models`` lists it (OpenAI's fields, then modeld's)."""
    try:
        created = int(owner.config.source.stat().st_mtime)
    except OSError:
        created = 0
    return {
        "id": owner.name,
        "object": "model",
        "created": created,
        "owned_by": "modeld",
        "backend": owner.config.backend,
        "state": str(owner.status.state),
    }
