"""OpenAI answers as the front door writes them: whole bodies and stream chunks."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from modeld.http.errors import ApiError
from modeld.http.openai_responses import (
    ChatFormat,
    CompletionFormat,
    embeddings_body,
    finish_reason,
)

AWKWARD = ['"quoted"', "back\\slash", "new\nline", "nul\0", "ünï", "\u2028", "</script>", ""]


@pytest.mark.parametrize("text", AWKWARD)
def test_chat_chunks_carry_any_text_as_valid_json(text: str) -> None:
    answer = ChatFormat("my model", include_usage=False)
    chunk = json.loads(answer.piece(text))
    assert chunk["object"] == "chat.completion.chunk" and chunk["model"] == "my model"
    assert chunk["id"] == answer.id and chunk["id"].startswith("chatcmpl-")
    assert chunk["choices"] == [
        {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    ]
    assert "usage" not in chunk
    assert b"\n" not in answer.piece(text)


@pytest.mark.parametrize("text", AWKWARD)
def test_completion_chunks_carry_any_text_as_valid_json(text: str) -> None:
    answer = CompletionFormat('a "model"', include_usage=True)
    chunk = json.loads(answer.piece(text))
    assert chunk["object"] == "text_completion" and chunk["model"] == 'a "model"'
    assert chunk["choices"] == [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]
    assert chunk["usage"] is None


def test_a_chat_stream_opens_with_the_role_and_closes_with_the_reason_and_usage() -> None:
    answer = ChatFormat("m", include_usage=True)
    opening = answer.opening()
    assert opening is not None
    assert json.loads(opening)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    closing = json.loads(answer.closing("length"))
    assert closing["choices"][0]["delta"] == {}
    assert closing["choices"][0]["finish_reason"] == "length"
    usage_chunk = answer.usage_chunk(3, 4)
    assert usage_chunk is not None
    last = json.loads(usage_chunk)
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert ChatFormat("m").usage_chunk(3, 4) is None
    assert CompletionFormat("m").opening() is None


def test_whole_answers() -> None:
    chat = ChatFormat("m").whole("Hello", "stop", 2, 1)
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert chat["usage"]["total_tokens"] == 3
    completion = CompletionFormat("m").whole(" there", "length", 1, 5)
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == " there"
    assert completion["choices"][0]["finish_reason"] == "length"


def test_finish_reason_is_length_only_when_the_limit_was_reached() -> None:
    assert finish_reason(16, 16) == "length"
    assert finish_reason(3, 16) == "stop"
    assert finish_reason(50, None) == "stop"


def test_embeddings_as_floats_or_base64_of_little_endian_float32() -> None:
    vectors = [[0.5, -0.25, 1.0], [0.0, 0.125, -1.0]]
    floats = embeddings_body("m", vectors, 4, as_base64=False)
    assert [d["embedding"] for d in floats["data"]] == vectors
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    packed = embeddings_body("m", vectors, 4, as_base64=True)
    decoded = [list(struct.unpack("<3f", base64.b64decode(d["embedding"]))) for d in packed["data"]]
    assert decoded == vectors


def test_errors_have_openai_shape_and_headers() -> None:
    error = ApiError(429, "full", code="queue_full", retry_after=2)
    assert json.loads(error.encoded()) == {
        "error": {
            "message": "full",
            "type": "rate_limit_error",
            "param": None,
            "code": "queue_full",
        }
    }
    response = error.response()
    assert response.status == 429 and response.headers["Retry-After"] == "2"
    assert response.content_type == "application/json"
    assert json.loads(ApiError(503, "x").encoded())["error"]["type"] == "server_error"
    assert json.loads(ApiError(400, "x", param="p").encoded())["error"]["param"] == "p"


def test_usage_never_reports_negative_counts_a_backend_got_wrong() -> None:
    from modeld.http.openai_responses import usage

    assert usage(-1, -7) == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert usage(3, 4)["total_tokens"] == 7
