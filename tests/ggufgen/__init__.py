"""GGUF model files for tests, made here from seeded random weights (nothing is downloaded).

``write_model(path, preset, seed)`` writes a llama-architecture model that llama.cpp loads, with
a small byte-level BPE tokenizer (``gpt2`` model, ``gpt-2`` pre-tokenizer: 256 byte tokens, merges
learnt from a built-in English text, three control tokens) and a ChatML chat template
(``<|im_start|>``/``<|im_end|>``; eos = ``<|im_end|>``). Two presets: ``tiny`` (under 1 MB) for
behaviour tests and ``large`` (about 310 MB F16) for memory tests.

Invariants the weights are built for:

- Same preset and seed: byte-identical file. Each tensor has its own generator seeded with
  ``(seed, tensor index)``, so the file does not depend on how it is written.
- The output depends on the prompt: matrices are drawn with standard deviation
  ``1/sqrt(fan_in)``, so activations keep unit scale through every layer.
- The output is printable and never ends early: channel 0 of the residual stream is a constant
  (``token_embd[:, 0] = 1``; no block writes to it) and acts as a bias in the output projection,
  which pushes the logits of non-printable byte tokens (everything but ASCII 0x20-0x7e, so no
  UTF-8 fragments) and of the control tokens (end of generation included) far below the rest.
  Generation therefore stops only at ``max_tokens``; llama-cpp-python overruns ``max_tokens``
  when it decodes incomplete UTF-8, which this also rules out.
- Memory-frugal: tensors are generated and written one at a time (largest: one F16 matrix).
"""

from __future__ import annotations

import itertools
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import gguf
import numpy as np
import numpy.typing as npt

__all__ = [
    "ARCHITECTURE",
    "CHAT_TEMPLATE",
    "CONTROL_TOKENS",
    "EOS_TOKEN",
    "PRESETS",
    "Preset",
    "Vocabulary",
    "build_vocabulary",
    "write_model",
]

ARCHITECTURE = "llama"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as stored in ``tokenizer.chat_template``."""

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Appended after the byte tokens and merges, in this order."""

EOS_TOKEN = "<|im_end|>"
"""The end-of-sequence (and end-of-turn) token; ``<|endoftext|>`` is bos and padding."""

_CORPUS = """
The quick brown fox jumps over the lazy dog. A model that runs on this machine reads the
prompt, looks at every word in turn and writes the next one. The service starts the backend
when the first request comes in, and stops it again when the memory is needed for another
model. Each request has a prompt, a number of tokens and a temperature; the answer is the text
that the model wrote, with the reason why it stopped. When the user asks a question, the
assistant gives an answer that is short and to the point. There is a queue of requests for
every model, and the requests are served in the order in which they came. If the system runs
out of memory, the oldest model that is not in use is the first one to go. The time it takes
to load a model depends on its size and on the speed of the disk. Tests check that the
service does what the documentation says, and that it keeps doing so under load.
"""

_PRETOKENIZE = re.compile(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")
"""An ASCII approximation of the gpt-2 pre-tokenizer, used to learn the merges."""

_BIAS_CHANNEL = 0
_BIAS_LOGIT = -256.0
"""Weight of the bias channel in the output rows of tokens that must not be generated."""


@dataclass(frozen=True)
class Preset:
    """Shape of a generated model.

    ``n_merges`` is an upper bound: the built-in corpus yields about 100 merges (pairs seen at
    least twice), so the vocabulary has 256 + merges + 3 control tokens.
    """

    name: str
    n_embd: int
    n_layer: int
    n_head: int
    n_ff: int
    n_ctx: int
    n_merges: int = 100

    @property
    def head_dim(self) -> int:
        """Dimension of one attention head (also the rope dimension)."""
        return self.n_embd // self.n_head


PRESETS: dict[str, Preset] = {
    "tiny": Preset(name="tiny", n_embd=64, n_layer=2, n_head=4, n_ff=128, n_ctx=256),
    "large": Preset(name="large", n_embd=1024, n_layer=12, n_head=16, n_ff=2816, n_ctx=2048),
}


@dataclass(frozen=True)
class Vocabulary:
    """A byte-level BPE vocabulary in the GPT-2 form llama.cpp's ``gpt2`` tokenizer reads."""

    tokens: tuple[str, ...]
    types: tuple[gguf.TokenType, ...]
    merges: tuple[str, ...]
    generable: tuple[bool, ...]
    """Whether the model may emit the token: printable ASCII only, no control token."""

    def token_id(self, text: str) -> int:
        """The id of a token given its stored text."""
        return self.tokens.index(text)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (space is ``Ġ``)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _learn_merges(n_merges: int, byte_map: dict[int, str]) -> list[tuple[str, str]]:
    """Greedy BPE training on the built-in corpus; ties are broken by the pair's text."""
    words = Counter(
        tuple(byte_map[b] for b in piece.encode()) for piece in _PRETOKENIZE.findall(_CORPUS)
    )
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def build_vocabulary(n_merges: int) -> Vocabulary:
    """Byte tokens (id = byte value), then up to ``n_merges`` merged tokens, then the controls."""
    byte_map = _byte_to_unicode()
    merges = _learn_merges(n_merges, byte_map)
    tokens = [byte_map[b] for b in range(256)] + [a + b for a, b in merges]
    generable = [0x20 <= b <= 0x7E for b in range(256)] + [True] * len(merges)
    types = [gguf.TokenType.NORMAL] * len(tokens) + [gguf.TokenType.CONTROL] * len(CONTROL_TOKENS)
    tokens += CONTROL_TOKENS
    generable += [False] * len(CONTROL_TOKENS)
    return Vocabulary(
        tokens=tuple(tokens),
        types=tuple(types),
        merges=tuple(f"{a} {b}" for a, b in merges),
        generable=tuple(generable),
    )


class _Init(Enum):
    ONES = "ones"
    EMBEDDING = "embedding"
    MATRIX = "matrix"
    NO_BIAS_WRITE = "matrix, row of the bias channel zero"
    OUTPUT = "output"


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    """numpy shape (out, in); GGUF stores it reversed."""
    init: _Init

    @property
    def dtype(self) -> type[np.floating]:
        return np.float32 if self.init is _Init.ONES else np.float16

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _tensor_plan(p: Preset, n_vocab: int) -> list[_Tensor]:
    d, ff = p.n_embd, p.n_ff
    plan = [_Tensor("token_embd.weight", (n_vocab, d), _Init.EMBEDDING)]
    for i in range(p.n_layer):
        blk = f"blk.{i}"
        plan += [
            _Tensor(f"{blk}.attn_norm.weight", (d,), _Init.ONES),
            _Tensor(f"{blk}.attn_q.weight", (d, d), _Init.MATRIX),
            _Tensor(f"{blk}.attn_k.weight", (d, d), _Init.MATRIX),
            _Tensor(f"{blk}.attn_v.weight", (d, d), _Init.MATRIX),
            _Tensor(f"{blk}.attn_output.weight", (d, d), _Init.NO_BIAS_WRITE),
            _Tensor(f"{blk}.ffn_norm.weight", (d,), _Init.ONES),
            _Tensor(f"{blk}.ffn_gate.weight", (ff, d), _Init.MATRIX),
            _Tensor(f"{blk}.ffn_up.weight", (ff, d), _Init.MATRIX),
            _Tensor(f"{blk}.ffn_down.weight", (d, ff), _Init.NO_BIAS_WRITE),
        ]
    plan += [
        _Tensor("output_norm.weight", (d,), _Init.ONES),
        _Tensor("output.weight", (n_vocab, d), _Init.OUTPUT),
    ]
    return plan


def _values(t: _Tensor, rng: np.random.Generator, vocab: Vocabulary) -> npt.NDArray[np.floating]:
    """The tensor's values; see the module docstring for why they are drawn this way."""
    if t.init is _Init.ONES:
        return np.ones(t.shape, dtype=np.float32)
    std = 1.0 if t.init is _Init.EMBEDDING else 1.0 / np.sqrt(t.shape[-1])
    values = rng.standard_normal(t.shape, dtype=np.float32)
    values *= np.float32(std)
    if t.init is _Init.EMBEDDING:
        values[:, _BIAS_CHANNEL] = 1.0
    elif t.init is _Init.NO_BIAS_WRITE:
        values[_BIAS_CHANNEL, :] = 0.0
    elif t.init is _Init.OUTPUT:
        blocked = ~np.array(vocab.generable)
        values[:, _BIAS_CHANNEL] = 0.0
        values[blocked, _BIAS_CHANNEL] = _BIAS_LOGIT
    return values.astype(np.float16)


def _tensors(
    plan: list[_Tensor], seed: int, vocab: Vocabulary
) -> Iterator[npt.NDArray[np.floating]]:
    for index, t in enumerate(plan):
        yield _values(t, np.random.default_rng([seed, index]), vocab)


def _add_metadata(
    w: gguf.GGUFWriter, p: Preset, seed: int, vocab: Vocabulary, pooling: gguf.PoolingType | None
) -> None:
    w.add_name(f"modeld-test-{p.name}")
    w.add_description(f"random weights for tests, preset {p.name}, seed {seed}")
    w.add_vocab_size(len(vocab.tokens))
    w.add_context_length(p.n_ctx)
    w.add_embedding_length(p.n_embd)
    w.add_block_count(p.n_layer)
    w.add_feed_forward_length(p.n_ff)
    w.add_head_count(p.n_head)
    w.add_head_count_kv(p.n_head)
    w.add_rope_dimension_count(p.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    if pooling is not None:
        w.add_pooling_type(pooling)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(list(vocab.tokens))
    w.add_token_types(list(vocab.types))
    w.add_token_merges(list(vocab.merges))
    w.add_bos_token_id(vocab.token_id("<|endoftext|>"))
    w.add_eos_token_id(vocab.token_id(EOS_TOKEN))
    w.add_eot_token_id(vocab.token_id(EOS_TOKEN))
    w.add_pad_token_id(vocab.token_id("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def write_model(
    path: os.PathLike[str] | str,
    preset: str | Preset = "tiny",
    seed: int = 0,
    *,
    pooling: gguf.PoolingType | None = gguf.PoolingType.MEAN,
) -> Path:
    """Write the GGUF model of ``preset`` drawn with ``seed`` to ``path`` and return the path.

    ``pooling`` is stored as ``llama.pooling_type``: it only matters in embedding mode, where
    llama.cpp then returns one vector per input. Real llama chat models have none (``None``
    here): llama.cpp then returns one vector per token unless the caller chooses a pooling.

    The file appears atomically (written beside it, then renamed), so concurrent writers of
    the same path are harmless. Memory use is bounded by the largest single tensor.
    """
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if p.n_embd % p.n_head:
        raise ValueError(f"n_embd {p.n_embd} is not a multiple of n_head {p.n_head}")
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    vocab = build_vocabulary(p.n_merges)
    plan = _tensor_plan(p, len(vocab.tokens))
    writer = gguf.GGUFWriter(partial, ARCHITECTURE)
    try:
        _add_metadata(writer, p, seed, vocab, pooling)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), t.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for values in _tensors(plan, seed, vocab):
            writer.write_tensor_data(values)
        writer.close()
        partial.replace(target)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return target
