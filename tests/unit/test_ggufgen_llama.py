"""The generated GGUF models as llama.cpp (llama-cpp-python) runs them.

Skipped where llama_cpp is not installed, unless MODELD_REQUIRE_LLAMA=1 (as in CI): then its
absence fails the module.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

if os.environ.get("MODELD_REQUIRE_LLAMA") == "1":
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the ggufgen package

import ggufgen

PROMPTS = ("The quick brown fox", "Tell me about the service")


def printable(text: str) -> bool:
    return text.isascii() and text.isprintable()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ggufgen.write_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "tiny", seed=0)


@pytest.fixture(scope="module")
def llm(tiny: Path) -> Iterator[Any]:
    model = llama_cpp.Llama(model_path=str(tiny), seed=7, n_ctx=256, verbose=False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def embedder(tiny: Path) -> Iterator[Any]:
    model = llama_cpp.Llama(model_path=str(tiny), seed=7, n_ctx=256, embedding=True, verbose=False)
    yield model
    model.close()


def complete(llm: Any, prompt: str, **kw: Any) -> tuple[str, dict[str, Any]]:
    out = llm.create_completion(prompt, **kw)
    choice = out["choices"][0]
    return choice["text"], {"finish": choice["finish_reason"], **out["usage"]}


def test_greedy_completion_is_printable_bounded_repeatable_and_prompt_dependent(llm: Any) -> None:
    texts = []
    for prompt in PROMPTS:
        text, usage = complete(llm, prompt, max_tokens=16, temperature=0)
        assert printable(text) and text
        assert usage["completion_tokens"] == 16 and usage["finish"] == "length"
        assert complete(llm, prompt, max_tokens=16, temperature=0)[0] == text
        texts.append(text)
    assert texts[0] != texts[1]


def test_sampling_never_overruns_max_tokens_nor_stops_early(llm: Any) -> None:
    for seed in range(4):
        llm.set_seed(seed)
        text, usage = complete(llm, PROMPTS[0], max_tokens=24, temperature=1.0, top_k=0)
        assert printable(text)
        assert usage["completion_tokens"] == 24 and usage["finish"] == "length"


def test_chat_completion_uses_the_chatml_template(llm: Any) -> None:
    assert llm.metadata["tokenizer.chat_template"] == ggufgen.CHAT_TEMPLATE
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and printable(message["content"])
    assert out["usage"]["completion_tokens"] == 8
    chatml = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert out["usage"]["prompt_tokens"] == len(llm.tokenize(chatml.encode(), special=True))


def test_stream_yields_at_most_max_tokens_chunks_then_a_final_one(llm: Any) -> None:
    chunks = list(llm.create_completion(PROMPTS[0], max_tokens=8, temperature=0, stream=True))
    body, last = chunks[:-1], chunks[-1]["choices"][0]
    assert 0 < len(body) <= 8
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    assert last["text"] == "" and last["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["text"] for c in body)
    assert streamed == complete(llm, PROMPTS[0], max_tokens=8, temperature=0)[0]


def test_tokenizer_round_trips_and_knows_the_control_tokens(llm: Any) -> None:
    text = b"Hello, the model runs!"
    tokens = llm.tokenize(text, add_bos=False)
    assert llm.detokenize(tokens) == text
    assert len(tokens) < len(text)  # merges apply
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [llm.token_eos()]
    im_end = ggufgen.build_vocabulary(ggufgen.PRESETS["tiny"].n_merges).token_id("<|im_end|>")
    assert llm.token_eos() == im_end


def test_embeddings_are_one_vector_per_input_that_depends_on_it(embedder: Any) -> None:
    a, b = (embedder.embed(p) for p in PROMPTS)
    assert len(a) == len(b) == ggufgen.PRESETS["tiny"].n_embd
    assert all(isinstance(x, float) for x in a)
    assert a != b
    assert embedder.embed(PROMPTS[0]) == a
    batch = embedder.create_embedding(list(PROMPTS))["data"]
    assert len(batch) == 2
    for got, want in zip(batch, (a, b), strict=True):
        assert got["embedding"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_embeddings_of_a_model_without_pooling_need_the_callers_choice(tmp_path: Path) -> None:
    path = ggufgen.write_model(tmp_path / "chat.gguf", pooling=None)
    model = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        verbose=False,
    )
    try:
        a, b = (model.embed(p) for p in PROMPTS)
    finally:
        model.close()
    assert len(a) == ggufgen.PRESETS["tiny"].n_embd and a != b


def test_large_preset_loads_into_anonymous_memory(tmp_path: Path) -> None:
    path = ggufgen.write_model(tmp_path / "large.gguf", "large", seed=0)
    size = path.stat().st_size
    assert 250e6 < size < 350e6
    me = psutil.Process()
    before = me.memory_info().rss
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, use_mmap=False, verbose=False)
    try:
        grown = me.memory_info().rss - before
        text, usage = complete(model, PROMPTS[0], max_tokens=4, temperature=0)
    finally:
        model.close()
    assert size * 0.9 < grown < size * 1.5
    assert printable(text) and usage["completion_tokens"] == 4
