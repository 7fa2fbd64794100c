"""Validation of OpenAI completion requests (the HTTP route's pure part)."""

from __future__ import annotations

import pytest

from modeld.http.completions import DEFAULT_MAX_TOKENS, BadRequest, parse_request


def test_a_full_request_maps_onto_predict_options() -> None:
    model, options, max_tokens = parse_request(
        {
            "model": "demo",
            "prompt": "Hi",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": ["\n", "."],
        }
    )
    assert (model, max_tokens) == ("demo", 7)
    assert options.Prompt == "Hi" and options.Tokens == 7 and options.Seed == 3
    assert options.Temperature == 0 and options.TopP == pytest.approx(0.5)
    assert list(options.StopPrompts) == ["\n", "."]


def test_defaults_and_accepted_shapes() -> None:
    _model, options, max_tokens = parse_request(
        {"model": "m", "prompt": ["one prompt"], "stop": "x"}
    )
    assert max_tokens == DEFAULT_MAX_TOKENS and options.Prompt == "one prompt"
    assert list(options.StopPrompts) == ["x"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"prompt": "x"}, "model"),
        ({"model": "m", "prompt": 3}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "stream": True}, "stream"),
        ({"model": "m", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "max_tokens": 1.5}, "max_tokens"),
        ({"model": "m", "temperature": "hot"}, "temperature"),
        ({"model": "m", "temperature": True}, "temperature"),
        ({"model": "m", "stop": [1]}, "stop"),
    ],
)
def test_bad_requests_name_the_parameter(body: object, param: str | None) -> None:
    with pytest.raises(BadRequest) as raised:
        parse_request(body)
    assert raised.value.param == param
