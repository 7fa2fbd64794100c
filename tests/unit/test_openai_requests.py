"""Reading OpenAI requests (the front door's pure part): what reaches the backend, and
which parameter a 400 names."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modeld.http.errors import ApiError
from modeld.http.openai_requests import (
    DEFAULT_COMPLETION_TOKENS,
    decode_json_object,
    parse_chat,
    parse_completion,
    parse_embeddings,
)


def refused(parse: Any, body: Any) -> ApiError:
    with pytest.raises(ApiError) as raised:
        parse(body)
    assert raised.value.status == 400
    return raised.value


def test_a_completion_maps_its_parameters_onto_predict_options() -> None:
    request = parse_completion(
        {
            "model": "demo",
            "prompt": "Hi",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": ["\n", "."],
            "presence_penalty": -1,
            "frequency_penalty": 1.5,
            "top_k": 4,
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    options = request.options
    assert (request.model, request.max_tokens, request.stream) == ("demo", 7, True)
    assert request.include_usage
    assert options.Prompt == "Hi" and options.Tokens == 7 and options.Seed == 3
    assert options.Temperature == 0 and options.TopP == pytest.approx(0.5)
    assert list(options.StopPrompts) == ["\n", "."]
    assert options.PresencePenalty == -1 and options.FrequencyPenalty == 1.5
    assert options.TopK == 4
    assert not options.UseTokenizerTemplate and not options.Messages


def test_completion_defaults_and_accepted_shapes() -> None:
    request = parse_completion({"model": "m", "prompt": ["one prompt"], "stop": "x"})
    assert request.max_tokens == DEFAULT_COMPLETION_TOKENS
    assert request.options.Tokens == DEFAULT_COMPLETION_TOKENS
    assert request.options.Prompt == "one prompt"
    assert list(request.options.StopPrompts) == ["x"]
    assert request.options.Temperature == 1.0 and request.options.TopP == 1.0
    assert not request.stream and not request.include_usage
    nulls = parse_completion({"model": "m", "max_tokens": None, "temperature": None, "n": None})
    assert nulls.max_tokens == DEFAULT_COMPLETION_TOKENS and nulls.options.Temperature == 1.0
    assert parse_completion({"model": "m", "max_tokens": 5.0}).max_tokens == 5


def test_include_usage_only_counts_for_streams() -> None:
    body = {"model": "m", "stream_options": {"include_usage": True}}
    assert not parse_completion(body).include_usage
    assert parse_completion({**body, "stream": True}).include_usage


def test_unsupported_parameters_are_ignored() -> None:
    request = parse_completion(
        {"model": "m", "prompt": "x", "logprobs": 3, "echo": True, "user": "u", "best_of": 1}
    )
    assert request.options.Prompt == "x"


def test_chat_messages_reach_the_backend_for_its_template() -> None:
    request = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                {"role": "tool", "content": "42", "tool_call_id": "1", "name": "calc"},
            ],
            "max_completion_tokens": 9,
            "max_tokens": 3,
        }
    )
    options = request.options
    assert options.UseTokenizerTemplate and options.Prompt == ""
    assert [(m.role, m.content) for m in options.Messages] == [
        ("system", "Be brief."),
        ("user", "a\nb"),
        ("assistant", ""),
        ("tool", "42"),
    ]
    assert json.loads(options.Messages[2].tool_calls) == [{"id": "1"}]
    assert (options.Messages[3].tool_call_id, options.Messages[3].name) == ("1", "calc")
    assert request.max_tokens == 9 and options.Tokens == 9


def test_a_chat_without_max_tokens_leaves_the_limit_to_the_backend() -> None:
    request = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert request.max_tokens is None and request.options.Tokens == 0
    assert (
        parse_chat(
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
        ).max_tokens
        == 4
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": ""}, "model"),
        ({"model": 3}, "model"),
        ({"model": "m", "prompt": 3}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": []}, "prompt"),
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "m", "prompt": "\udc80"}, "prompt"),
        ({"model": "m", "stream": "yes"}, "stream"),
        ({"model": "m", "stream": True, "stream_options": []}, "stream_options"),
        (
            {"model": "m", "stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
        ),
        ({"model": "m", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "max_tokens": "8"}, "max_tokens"),
        ({"model": "m", "max_tokens": 2**31}, "max_tokens"),
        ({"model": "m", "temperature": "hot"}, "temperature"),
        ({"model": "m", "temperature": True}, "temperature"),
        ({"model": "m", "temperature": 2.5}, "temperature"),
        ({"model": "m", "temperature": float("nan")}, "temperature"),
        ({"model": "m", "top_p": -0.1}, "top_p"),
        ({"model": "m", "top_k": -1}, "top_k"),
        ({"model": "m", "seed": 2**40}, "seed"),
        ({"model": "m", "presence_penalty": 3}, "presence_penalty"),
        ({"model": "m", "frequency_penalty": [1]}, "frequency_penalty"),
        ({"model": "m", "stop": [1]}, "stop[0]"),
        ({"model": "m", "stop": {"a": 1}}, "stop"),
        ({"model": "m", "n": 2}, "n"),
        ({"model": "m", "n": 0}, "n"),
    ],
)
def test_bad_completions_name_the_parameter(body: dict[str, Any], param: str) -> None:
    assert refused(parse_completion, body).param == param


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (None, "messages"),
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
        (
            [{"role": "user", "content": [{"type": "text", "text": 1}]}],
            "messages[0].content[0].text",
        ),
        ([{"role": "user", "content": "ok"}, {"role": "user", "name": 3}], "messages[1].name"),
    ],
)
def test_bad_chat_messages_name_the_message(messages: Any, param: str) -> None:
    assert refused(parse_chat, {"model": "m", "messages": messages}).param == param


def test_embeddings_take_a_string_or_strings() -> None:
    one = parse_embeddings({"model": "m", "input": "text"})
    assert one.inputs == ("text",) and not one.base64
    many = parse_embeddings({"model": "m", "input": ["a", "b"], "encoding_format": "base64"})
    assert many.inputs == ("a", "b") and many.base64
    assert parse_embeddings({"model": "m", "input": "x", "dimensions": 8}).inputs == ("x",)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": [1, 2]}, "input"),
        ({"model": "m", "input": [[1, 2]]}, "input"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": ["a", ""]}, "input[1]"),
        ({"model": "m", "input": ["a", None]}, "input[1]"),
        ({"model": "m", "input": ["x"] * 2049}, "input"),
        ({"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format"),
    ],
)
def test_bad_embeddings_name_the_parameter(body: dict[str, Any], param: str) -> None:
    assert refused(parse_embeddings, body).param == param


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty"),
        (b"  \n", "empty"),
        (b"{", "not valid JSON"),
        (b'{"model": "m",}', "not valid JSON"),
        (b"[1]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b'{"prompt": "\xff"}', "not valid UTF-8 (byte 12)"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_bodies_that_are_not_a_json_object_are_refused(raw: bytes, problem: str) -> None:
    error = refused(decode_json_object, raw)
    assert problem in error.message and error.param is None


def test_a_json_object_body_is_decoded() -> None:
    assert decode_json_object(b'{"model": "d\xc3\xa9mo"}') == {"model": "démo"}
