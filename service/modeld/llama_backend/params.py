"""LocalAI's request messages as llama-cpp-python arguments (pure: no llama_cpp import).

Zero means "not set" in proto3, so a zero field leaves llama.cpp's own default, except
``Temperature``: 0 is greedy decoding, the OpenAI front door's mapping of an explicit 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from modeld.backend_kit.options import model_path

INSTALL_HINT = (
    "install the llama-cpp extra into the Python that runs modeld"
    " (pip install 'modeld[llama-cpp]'; see the README, 'Serving GGUF files')"
)
DEFAULT_CONTEXT = 0
"""``n_ctx`` when ContextSize is unset: 0 is the context the model was trained with."""


@dataclass(frozen=True, slots=True)
class LoadSettings:
    """What LoadModel asks of llama.cpp."""

    path: str
    n_ctx: int
    n_threads: int | None
    n_gpu_layers: int
    embedding: bool
    use_mmap: bool
    use_mlock: bool
    seed: int | None

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``llama_cpp.Llama`` (pooling is set by the caller)."""
        kwargs: dict[str, Any] = {
            "model_path": self.path,
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.n_gpu_layers,
            "embedding": self.embedding,
            "use_mmap": self.use_mmap,
            "use_mlock": self.use_mlock,
            "verbose": False,
        }
        if self.n_threads is not None:
            kwargs["n_threads"] = self.n_threads
        if self.seed is not None:
            kwargs["seed"] = self.seed
        return kwargs


def load_settings(request: Any) -> LoadSettings:
    """LoadSettings of a ModelOptions; raises ValueError for a missing or unusable file."""
    path = model_path(request)
    if not path:
        raise ValueError("no model file given (set the model's `model` key to a GGUF file)")
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise ValueError(f"model file {path} {what}")
    return LoadSettings(
        path=path,
        n_ctx=request.ContextSize if request.ContextSize > 0 else DEFAULT_CONTEXT,
        n_threads=request.Threads if request.Threads > 0 else None,
        n_gpu_layers=max(0, request.NGPULayers),
        embedding=bool(request.Embeddings),
        use_mmap=bool(request.MMap),
        use_mlock=bool(request.MLock),
        seed=request.Seed if request.Seed > 0 else None,
    )


def sampling_kwargs(request: Any) -> dict[str, Any]:
    """Sampling arguments of ``create_completion`` / ``create_chat_completion``.

    ``max_tokens`` unset means up to the end of the context (llama-cpp-python's None).
    """
    kwargs: dict[str, Any] = {
        "max_tokens": request.Tokens if request.Tokens > 0 else None,
        "temperature": max(0.0, float(request.Temperature)),
    }
    if request.TopP > 0:
        kwargs["top_p"] = float(request.TopP)
    if request.TopK > 0:
        kwargs["top_k"] = int(request.TopK)
    if request.StopPrompts:
        kwargs["stop"] = list(request.StopPrompts)
    if request.Seed > 0:
        kwargs["seed"] = int(request.Seed)
    if request.PresencePenalty:
        kwargs["presence_penalty"] = float(request.PresencePenalty)
    if request.FrequencyPenalty:
        kwargs["frequency_penalty"] = float(request.FrequencyPenalty)
    return kwargs


def chat_messages(request: Any) -> list[dict[str, str]] | None:
    """The chat to render with the model's template, or None for a plain prompt.

    A chat is ``Messages`` with ``UseTokenizerTemplate`` and no ``Prompt`` (a Prompt
    means the caller already rendered it).
    """
    if request.Prompt or not request.UseTokenizerTemplate or not request.Messages:
        return None
    return [{"role": m.role or "user", "content": m.content} for m in request.Messages]


def plain_prompt(request: Any) -> str:
    """The prompt of a non-chat request: Prompt, else the messages' contents by line."""
    if request.Prompt:
        return str(request.Prompt)
    return "\n".join(m.content for m in request.Messages if m.content)


def embedding_input(request: Any) -> str:
    """The text to embed: Embeddings (LocalAI's field), else Prompt."""
    return str(request.Embeddings or request.Prompt)
