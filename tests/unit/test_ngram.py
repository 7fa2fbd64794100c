"""In-process tests of the reference backend's model code and knob parsing (no gRPC)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeld.reference_backend.knobs import KnobError, Knobs, parse_knobs
from modeld.reference_backend.ngram import (
    EMBEDDING_DIM,
    NgramModel,
    SamplingParams,
    detokenize,
    embed,
    stable_hash,
    tokenize,
)

SERVICE = Path(__file__).resolve().parents[2] / "service"

DEMO = SERVICE / "modeld" / "data" / "demo.txt"


@pytest.fixture(scope="module")
def demo_model() -> NgramModel:
    return NgramModel.from_text(DEMO.read_text(encoding="utf-8"))


def test_tokenize_words_and_punctuation() -> None:
    assert tokenize("The keeper's well-known lamp (lit), 20% brighter!") == [
        "The", "keeper's", "well-known", "lamp", "(", "lit", ")", ",", "20", "%", "brighter", "!",
    ]  # fmt: skip
    assert detokenize(tokenize("A lamp (lit), brighter!")) == "A lamp (lit), brighter!"


@given(st.text(max_size=80))
def test_detokenize_keeps_tokens(text: str) -> None:
    tokens = tokenize(text)
    assert tokenize(detokenize(tokens)) == tokens


def test_stable_hash_is_fixed() -> None:
    # blake2b, not hash(): the same in every process and every Python.
    assert stable_hash("sea") == stable_hash("sea")
    assert stable_hash("sea") != stable_hash("Sea")
    assert stable_hash("sea") == 0xF1553BFCF782DDF5


def test_model_needs_tokens() -> None:
    with pytest.raises(ValueError):
        NgramModel.from_text("   \n\t ")


def test_greedy_follows_trigrams() -> None:
    model = NgramModel.from_text("one two three. one two four. one two three.")
    out, n = model.generate_text("One two", SamplingParams(max_tokens=2))
    assert (out, n) == (" three.", 2)  # context matched case-insensitively, most frequent wins
    assert model.vocab_size == 5  # one two three . four
    assert model.token_id("one") == 0
    assert model.token_id("nine") >= model.vocab_size


def test_unknown_context_backs_off_to_unigrams() -> None:
    model = NgramModel.from_text("a b a b a c")
    tokens = list(model.generate_tokens(["zzz"], SamplingParams(max_tokens=1)))
    assert tokens == ["a"]  # the most frequent token


def test_generation_respects_limits(demo_model: NgramModel) -> None:
    params = SamplingParams(max_tokens=17, temperature=0.9, seed=4, top_k=3)
    first = list(demo_model.generate("The sea", params))
    assert len(first) == 17
    assert all(chunk.tokens == 1 for chunk in first)
    assert first == list(demo_model.generate("The sea", params))


@pytest.mark.parametrize("span", [(10, 14), (0, 3), (1, 2), (20, 31)])
def test_stop_strings_cut_before_the_stop(demo_model: NgramModel, span: tuple[int, int]) -> None:
    full, _ = demo_model.generate_text("The lamp", SamplingParams(max_tokens=40))
    stop = full[span[0] : span[1]]
    params = SamplingParams(max_tokens=40, stop=("never there", stop))
    chunks = list(demo_model.generate("The lamp", params))
    text = "".join(c.text for c in chunks)
    assert text == full[: full.index(stop)]
    assert (text, sum(c.tokens for c in chunks)) == demo_model.generate_text("The lamp", params)
    assert all(c.text for c in chunks)


def test_held_back_stop_prefix_is_flushed_at_the_end() -> None:
    model = NgramModel.from_text("a b a b a b")
    params = SamplingParams(max_tokens=3, stop=(" b c",))
    chunks = list(model.generate("a", params))
    assert "".join(c.text for c in chunks) == " b a b"
    assert sum(c.tokens for c in chunks) == 3


def test_embed_unit_length_and_order_sensitive() -> None:
    a = embed("light over water")
    assert len(a) == EMBEDDING_DIM
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-9)
    assert embed("Light over water") == a  # case-insensitive
    assert embed("water over light") != a
    assert math.isclose(sum(x * x for x in embed("")), 1.0, rel_tol=1e-9)


def test_parse_knobs_all() -> None:
    knobs = parse_knobs(
        [
            "load_delay=1.5",
            "alloc_mb=8",
            "fail_load=no: really",
            "crash_on_load=4",
            "crash_after=2",
            "predict_delay=0.25",
            "hang_on_load",
            "hang_after=9",
            "ignore_sigterm=true",
            "",
        ]
    )
    assert knobs == Knobs(
        load_delay=1.5,
        alloc_mb=8,
        fail_load="no: really",
        crash_on_load=4,
        crash_after=2.0,
        predict_delay=0.25,
        hang_on_load=True,
        hang_after=9.0,
        ignore_sigterm=True,
    )
    assert parse_knobs([]) == Knobs()
    assert parse_knobs(["ignore_sigterm:0"]).ignore_sigterm is False  # LocalAI spelling


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("frobnicate=1", "frobnicate"),
        ("load_delay=soon", "load_delay"),
        ("load_delay=-1", "load_delay"),
        ("alloc_mb=1.5", "alloc_mb"),
        ("crash_on_load=300", "crash_on_load"),
        ("hang_on_load=maybe", "hang_on_load"),
        ("predict_delay=nan", "predict_delay"),
    ],
)
def test_parse_knobs_errors_name_the_key(option: str, key: str) -> None:
    with pytest.raises(KnobError, match=key):
        parse_knobs([option])
