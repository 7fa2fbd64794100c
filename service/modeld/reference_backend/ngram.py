"""A word-level trigram language model with backoff, plus its tokenizer and embeddings.

Pure standard library. The model is trained from a text in one pass:

* tokens are words (letters/digits, with inner apostrophes and hyphens) and single
  punctuation marks;
* contexts are matched case-insensitively, predicted tokens keep their case;
* generation uses the trigram continuation of the last two tokens if the text has one,
  else the bigram continuation of the last token, else the unigram distribution
  ("stupid backoff" without discounting).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

_TOKEN_RE = re.compile(r"\w+(?:[-'\u2019]\w+)*|[^\w\s]")
# No space is written before these tokens, nor after the opening ones.
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%\u2019\u201d\u2026")
_NO_SPACE_AFTER = frozenset("([{\u2018\u201c")

EMBEDDING_DIM = 64
# Ids of tokens outside the vocabulary: vocab_size + a stable hash below this bound.
_UNKNOWN_ID_SPACE = 1 << 20


def tokenize(text: str) -> list[str]:
    """Split ``text`` into word and punctuation tokens."""
    return _TOKEN_RE.findall(text)


def piece(token: str, previous: str | None) -> str:
    """Return ``token`` as it is written after ``previous`` (None: at the very start).

    The result carries its own leading space where one belongs, so that joining the
    pieces of consecutive tokens gives readable text.
    """
    if previous is None or token in _NO_SPACE_BEFORE or previous in _NO_SPACE_AFTER:
        return token
    return " " + token


def detokenize(tokens: Iterable[str]) -> str:
    """Join tokens into text with conventional spacing around punctuation."""
    out: list[str] = []
    previous: str | None = None
    for token in tokens:
        out.append(piece(token, previous))
        previous = token
    return "".join(out)


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (unlike ``hash()``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _token_vector(feature: str) -> list[float]:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=EMBEDDING_DIM).digest()
    return [(b - 127.5) / 127.5 for b in digest]


def embed(text: str) -> list[float]:
    """Deterministic L2-normalised embedding of ``text`` (dimension ``EMBEDDING_DIM``).

    The sum of hashed vectors of the lower-cased tokens and, with half weight, of the
    token bigrams (so word order matters a little). Text without tokens embeds as the
    vector of a fixed marker, so the result is always a unit vector.
    """
    tokens = [t.lower() for t in tokenize(text)] or ["\x00empty"]
    acc = [0.0] * EMBEDDING_DIM
    features: list[tuple[str, float]] = [(t, 1.0) for t in tokens]
    features += [(f"{a}\x00{b}", 0.5) for a, b in itertools.pairwise(tokens)]
    for feature, weight in features:
        for i, value in enumerate(_token_vector(feature)):
            acc[i] += weight * value
    norm = math.sqrt(sum(v * v for v in acc))
    if norm == 0.0:  # pragma: no cover - would need a perfectly cancelling text
        return _token_vector("\x00empty")
    return [v / norm for v in acc]


class Chunk(NamedTuple):
    """A piece of generated text and the number of tokens it accounts for."""

    text: str
    tokens: int


@dataclass(frozen=True)
class Continuations:
    """Possible next tokens of one context, most frequent first (ties: lower id first)."""

    ids: tuple[int, ...]
    counts: tuple[int, ...]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    ``temperature`` 0 means greedy (always the most frequent continuation); ``top_k`` 0
    means no limit; ``seed`` None means a random seed.
    """

    max_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def _freeze(table: dict[int, int]) -> Continuations:
    items = sorted(table.items(), key=lambda kv: (-kv[1], kv[0]))
    return Continuations(tuple(k for k, _ in items), tuple(v for _, v in items))


class NgramModel:
    """Trigram model with backoff to bigrams and unigrams; immutable once trained."""

    def __init__(self, tokens: Sequence[str]) -> None:
        """Train on ``tokens`` (at least one)."""
        if not tokens:
            raise ValueError("no tokens to train on")
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []
        lower_ids: dict[str, int] = {}
        seq: list[int] = []
        lseq: list[int] = []
        for token in tokens:
            tid = self.vocab.get(token)
            if tid is None:
                tid = self.vocab[token] = len(self.words)
                self.words.append(token)
            seq.append(tid)
            lseq.append(lower_ids.setdefault(token.lower(), len(lower_ids)))
        self._lower_ids = lower_ids
        self._n_lower = len(lower_ids)
        self.n_tokens = len(seq)

        uni: dict[int, int] = {}
        bi: dict[int, dict[int, int]] = {}
        tri: dict[int, dict[int, int]] = {}
        for i, tid in enumerate(seq):
            uni[tid] = uni.get(tid, 0) + 1
            if i >= 1:
                row = bi.setdefault(lseq[i - 1], {})
                row[tid] = row.get(tid, 0) + 1
            if i >= 2:
                row = tri.setdefault(lseq[i - 2] * self._n_lower + lseq[i - 1], {})
                row[tid] = row.get(tid, 0) + 1
        self._unigrams = _freeze(uni)
        self._bigrams = {k: _freeze(v) for k, v in bi.items()}
        self._trigrams = {k: _freeze(v) for k, v in tri.items()}
        self.n_bigram_contexts = len(self._bigrams)
        self.n_trigram_contexts = len(self._trigrams)
        self.approx_bytes = self._estimate_size()

    @classmethod
    def from_text(cls, text: str) -> NgramModel:
        """Train on a text (raises ValueError if it has no tokens)."""
        return cls(tokenize(text))

    def _estimate_size(self) -> int:
        """Rough bytes held by the model's tables (for Status' memory breakdown)."""
        size = sys.getsizeof(self.vocab) + sys.getsizeof(self.words)
        size += sum(sys.getsizeof(w) for w in self.words)
        for table in (self._bigrams, self._trigrams):
            size += sys.getsizeof(table)
            for cont in table.values():
                size += 64 + sys.getsizeof(cont.ids) + sys.getsizeof(cont.counts)
        return size

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens (case-sensitive)."""
        return len(self.words)

    def token_id(self, token: str) -> int:
        """Vocabulary id of ``token``; unknown tokens get a stable id past the vocabulary."""
        tid = self.vocab.get(token)
        if tid is None:
            tid = self.vocab_size + stable_hash(token) % _UNKNOWN_ID_SPACE
        return tid

    def _continuations(self, context: Sequence[str]) -> Continuations:
        lower = [self._lower_ids.get(t.lower()) for t in context[-2:]]
        if len(lower) == 2 and lower[0] is not None and lower[1] is not None:
            cont = self._trigrams.get(lower[0] * self._n_lower + lower[1])
            if cont is not None:
                return cont
        if lower and lower[-1] is not None:
            cont = self._bigrams.get(lower[-1])
            if cont is not None:
                return cont
        return self._unigrams

    def _pick(self, cont: Continuations, params: SamplingParams, rng: random.Random) -> int:
        n = len(cont.ids)
        if params.top_k > 0:
            n = min(n, params.top_k)
        if params.temperature <= 0.0 or n == 1:
            return cont.ids[0]
        inv_t = 1.0 / params.temperature
        top = cont.counts[0]
        # Scale by the top count first so that large counts cannot overflow.
        weights = [(c / top) ** inv_t for c in cont.counts[:n]]
        return rng.choices(cont.ids[:n], weights=weights)[0]

    def generate_tokens(
        self, prompt_tokens: Sequence[str], params: SamplingParams
    ) -> Iterator[str]:
        """Yield up to ``params.max_tokens`` tokens continuing ``prompt_tokens``."""
        rng = random.Random(params.seed)
        context = list(prompt_tokens[-2:])
        for _ in range(params.max_tokens):
            token = self.words[self._pick(self._continuations(context), params, rng)]
            context = [*context[-1:], token]
            yield token

    def generate(
        self, prompt: str, params: SamplingParams, *, new_turn: bool = False
    ) -> Iterator[Chunk]:
        """Yield the text continuing ``prompt`` in chunks, honouring stop strings.

        Without stop strings each chunk is one token with its leading space; with
        ``new_turn`` (a chat reply) the text starts a new turn: no space before its first
        token. Text that
        could be the start of a stop string is held back until it is known not to be;
        when a stop string appears, generation ends and the text is cut just before it.
        So joining the chunks always gives the same text as a non-streamed generation,
        and no part of a stop string is ever yielded.
        """
        prompt_tokens = tokenize(prompt)
        previous: str | None = prompt_tokens[-1] if prompt_tokens and not new_turn else None
        stops = [s for s in params.stop if s]
        pending = ""  # generated, not yet yielded; any stop match can only start here
        pending_tokens = 0
        for token in self.generate_tokens(prompt_tokens, params):
            pending += piece(token, previous)
            pending_tokens += 1
            previous = token
            if not stops:
                yield Chunk(pending, pending_tokens)
                pending, pending_tokens = "", 0
                continue
            cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut > 0:  # the token that completed the stop string is not counted
                    yield Chunk(pending[:cut], pending_tokens - 1)
                return
            hold = _stop_prefix_len(pending, stops)
            if hold < len(pending):
                yield Chunk(pending[: len(pending) - hold], pending_tokens)
                pending, pending_tokens = pending[len(pending) - hold :], 0
        if pending:
            yield Chunk(pending, pending_tokens)

    def generate_text(
        self, prompt: str, params: SamplingParams, *, new_turn: bool = False
    ) -> tuple[str, int]:
        """The whole continuation of ``prompt`` and the number of tokens it counts."""
        chunks = list(self.generate(prompt, params, new_turn=new_turn))
        return "".join(c.text for c in chunks), sum(c.tokens for c in chunks)


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
