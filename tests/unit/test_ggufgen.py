"""The GGUF test-model generator (tests/ggufgen): file properties that need no llama.cpp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tests/: the ggufgen package

import ggufgen  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ggufgen.write_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf", "tiny", seed=0)


@pytest.fixture(scope="module")
def reader(tiny: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(tiny)


def field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    assert f is not None, f"{key} missing"
    return f.contents()


def test_tiny_preset_is_small(tiny: Path) -> None:
    assert 100_000 < tiny.stat().st_size < 1_000_000


def test_same_seed_gives_the_same_bytes(tiny: Path, tmp_path: Path) -> None:
    again = ggufgen.write_model(tmp_path / "again.gguf", "tiny", seed=0)
    assert again.read_bytes() == tiny.read_bytes()


def test_another_seed_gives_other_weights(tiny: Path, tmp_path: Path) -> None:
    other = ggufgen.write_model(tmp_path / "other.gguf", "tiny", seed=1)
    assert other.stat().st_size == tiny.stat().st_size
    assert other.read_bytes() != tiny.read_bytes()


def test_writing_leaves_only_the_model(tmp_path: Path) -> None:
    path = ggufgen.write_model(tmp_path / "m.gguf")
    assert path == tmp_path / "m.gguf"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_hyperparameters_match_the_preset(reader: gguf.GGUFReader) -> None:
    p = ggufgen.PRESETS["tiny"]
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.embedding_length") == p.n_embd
    assert field(reader, "llama.block_count") == p.n_layer
    assert field(reader, "llama.attention.head_count") == p.n_head
    assert field(reader, "llama.feed_forward_length") == p.n_ff
    assert field(reader, "llama.context_length") == p.n_ctx
    assert field(reader, "llama.rope.dimension_count") == p.head_dim
    assert field(reader, "llama.pooling_type") == gguf.PoolingType.MEAN


def test_tokenizer_is_byte_level_bpe_with_chatml_controls(reader: gguf.GGUFReader) -> None:
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(tokens) == len(types) == 256 + len(merges) + len(ggufgen.CONTROL_TOKENS)
    assert len(set(tokens)) == len(tokens)
    assert tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ" and tokens[ord("\n")] == "Ċ"
    for merge in merges:
        left, right = merge.split(" ")
        assert left in tokens and right in tokens and left + right in tokens
    eos = field(reader, "tokenizer.ggml.eos_token_id")
    assert tokens[eos] == "<|im_end|>"
    assert field(reader, "tokenizer.ggml.eot_token_id") == eos
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    for control in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert types[tokens.index(control)] == gguf.TokenType.CONTROL
    assert types[ord("A")] == gguf.TokenType.NORMAL


def test_chat_template_is_chatml(reader: gguf.GGUFReader) -> None:
    template = field(reader, "tokenizer.chat_template")
    assert template == ggufgen.CHAT_TEMPLATE
    assert "<|im_start|>" in template and "<|im_end|>" in template
    assert "add_generation_prompt" in template


def test_tensors_are_the_llama_set(reader: gguf.GGUFReader) -> None:
    p = ggufgen.PRESETS["tiny"]
    n_vocab = len(field(reader, "tokenizer.ggml.tokens"))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 9 * p.n_layer + 1
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert list(tensors["token_embd.weight"].shape) == [p.n_embd, n_vocab]  # GGUF order
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [p.n_ff, p.n_embd]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_output_projection_suppresses_unprintable_and_control_tokens(
    reader: gguf.GGUFReader,
) -> None:
    tokens = field(reader, "tokenizer.ggml.tokens")
    output = next(t for t in reader.tensors if t.name == "output.weight").data
    blocked = output[:, 0] < 0
    printable = [0x20 <= b <= 0x7E for b in range(256)]
    expected = printable + [True] * (len(tokens) - 256 - 3) + [False] * 3
    assert list(~blocked) == expected
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight").data
    assert np.all(embd[:, 0] == 1)  # the constant channel that carries the bias


def test_matrices_are_scaled_by_fan_in(reader: gguf.GGUFReader) -> None:
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight").data
    fan_in = ggufgen.PRESETS["tiny"].n_ff
    assert np.std(down[1:].astype(np.float32)) == pytest.approx(fan_in**-0.5, rel=0.1)
    assert np.all(down[0] == 0)  # no block writes to the constant channel


def test_command_line_writes_a_model(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    run = subprocess.run(
        [sys.executable, str(TESTS / "ggufgen"), "--preset", "tiny", "--seed", "3", "--out", out],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(out) in run.stdout
    assert out.read_bytes() == ggufgen.write_model(tmp_path / "lib.gguf", seed=3).read_bytes()
