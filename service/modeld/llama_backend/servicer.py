"""The gRPC servicer of the llama-cpp backend: one llama.cpp model and one method per RPC.

A ``Llama`` object is not thread-safe: every use of it (generation, embedding,
tokenization, closing) holds ``_model_lock``, so gRPC's worker threads take turns;
``Status`` says BUSY while any request holds or waits for it. modeld's ``parallel`` slots
should stay at 1 for this backend (more only queue here).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc

from modeld.backend_kit.log import log
from modeld.backend_kit.memory import release_memory
from modeld.backend_kit.rpc import RpcAbort, streaming, unary
from modeld.backend_kit.server import ProcessControl
from modeld.backend_kit.status import status_reply
from modeld.llama_backend.params import (
    INSTALL_HINT,
    LoadSettings,
    chat_messages,
    embedding_input,
    load_settings,
    plain_prompt,
    sampling_kwargs,
)
from modeld.rpc import backend_pb2 as pb


@dataclass
class Loaded:
    """A loaded model and how it was loaded."""

    llm: Any
    settings: LoadSettings
    file_size: int


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        raise ValueError(f"llama-cpp-python is not available ({e}): {INSTALL_HINT}") from None
    return llama_cpp


def _open(settings: LoadSettings) -> Any:
    """Load the model file into a ``Llama``; raises ValueError with a readable reason."""
    llama_cpp = _import_llama_cpp()
    kwargs = settings.llama_kwargs()
    if settings.embedding:
        kwargs["pooling_type"] = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    if settings.n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
        log(
            f"NGPULayers={settings.n_gpu_layers} asked, but this llama-cpp-python has no GPU"
            " offload (build it with CMAKE_ARGS=-DGGML_CUDA=on): running on the CPU"
        )
    try:
        return llama_cpp.Llama(**kwargs)
    except (ValueError, RuntimeError, OSError) as e:
        raise ValueError(f"llama.cpp cannot load {settings.path}: {e}") from None


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str:
    choice = chunk["choices"][0]
    if chat:
        return str(choice.get("delta", {}).get("content") or "")
    return str(choice.get("text") or "")


class LlamaBackend:
    """State of the llama-cpp backend and its RPC methods (LocalAI ``backend.Backend``)."""

    def __init__(self, control: ProcessControl) -> None:
        self._control = control
        self._lock = threading.Lock()  # guards _loaded and _busy
        self._model_lock = threading.Lock()  # one use of the Llama object at a time
        self._loaded: Loaded | None = None
        self._busy = 0

    def _require_model(self) -> Loaded:
        loaded = self._loaded
        if loaded is None:
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, "no model loaded")
        return loaded

    @contextmanager
    def _using_model(self) -> Iterator[Loaded]:
        """Hold the model for one request (counted as busy while waiting and working)."""
        with self._lock:
            self._busy += 1
        try:
            with self._model_lock:
                yield self._require_model()
        finally:
            with self._lock:
                self._busy -= 1

    def _close(self) -> Loaded | None:
        """Close and forget the loaded model (the caller holds ``_model_lock``)."""
        with self._lock:
            had, self._loaded = self._loaded, None
        if had is not None:
            had.llm.close()
            release_memory()
        return had

    # -- RPCs --------------------------------------------------------------------

    @unary
    def Health(self, request: Any, context: Any) -> Any:
        """Liveness: Reply(message=b"OK")."""
        return pb.Reply(message=b"OK")

    @unary
    def LoadModel(self, request: Any, context: Any) -> Any:
        """Load a GGUF file, replacing any model already loaded."""
        started = time.monotonic()
        try:
            settings = load_settings(request)
            with self._model_lock:
                self._close()
                llm = _open(settings)
                loaded = Loaded(llm, settings, os.path.getsize(settings.path))
                with self._lock:
                    self._loaded = loaded
        except ValueError as e:
            log(f"LoadModel failed: {e}")
            return pb.Result(success=False, message=str(e))
        template = (
            "the GGUF's chat template"
            if llm.metadata.get("tokenizer.chat_template")
            else (f"chat format {llm.chat_format or 'none'}")
        )
        summary = (
            f"context {llm.n_ctx()}, vocabulary {llm.n_vocab()}, {template},"
            f" mmap {'on' if settings.use_mmap else 'off'},"
            f" {'embeddings' if settings.embedding else 'generation'}"
        )
        log(f"loaded {settings.path} ({summary}) in {time.monotonic() - started:.3f}s")
        return pb.Result(success=True, message=f"loaded {settings.path}: {summary}")

    @unary
    def Predict(self, request: Any, context: Any) -> Any:
        """Generate the whole answer in one Reply (usage from llama.cpp's own count)."""
        messages = chat_messages(request)
        with self._using_model() as loaded:
            started = time.monotonic()
            if messages is not None:
                result = loaded.llm.create_chat_completion(
                    messages=messages, **sampling_kwargs(request)
                )
                text = result["choices"][0]["message"].get("content") or ""
            else:
                result = loaded.llm.create_completion(
                    plain_prompt(request), **sampling_kwargs(request)
                )
                text = result["choices"][0]["text"]
            elapsed_ms = (time.monotonic() - started) * 1000.0
        usage = result.get("usage", {})
        return pb.Reply(
            message=text.encode("utf-8"),
            tokens=int(usage.get("completion_tokens", 0)),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            timing_token_generation=elapsed_ms,
        )

    @streaming
    def PredictStream(self, request: Any, context: Any) -> Iterator[Any]:
        """Generate the answer one Reply per token; stops when the caller goes away."""
        messages = chat_messages(request)
        with self._using_model() as loaded:
            llm = loaded.llm
            if messages is not None:
                chunks = llm.create_chat_completion(
                    messages=messages, stream=True, **sampling_kwargs(request)
                )
                prompt_tokens = 0
            else:
                prompt = plain_prompt(request)
                prompt_tokens = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True))
                chunks = llm.create_completion(prompt, stream=True, **sampling_kwargs(request))
            try:
                for chunk in chunks:
                    if not context.is_active():
                        return
                    text = _chunk_text(chunk, messages is not None)
                    if text:
                        yield pb.Reply(
                            message=text.encode("utf-8"), tokens=1, prompt_tokens=prompt_tokens
                        )
            finally:
                chunks.close()

    @unary
    def Embedding(self, request: Any, context: Any) -> Any:
        """Mean-pooled, unit-length embedding of the text (the model needs Embeddings)."""
        with self._using_model() as loaded:
            if not loaded.settings.embedding:
                raise RpcAbort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this model was loaded without embeddings: set Embeddings = true"
                    " in the model's [options]",
                )
            vector = loaded.llm.embed(embedding_input(request), normalize=True)
        return pb.EmbeddingResult(embeddings=vector)

    @unary
    def TokenizeString(self, request: Any, context: Any) -> Any:
        """Token ids of Prompt in the model's vocabulary (no BOS, special tokens as text)."""
        with self._using_model() as loaded:
            ids = loaded.llm.tokenize(str(request.Prompt).encode("utf-8"), add_bos=False)
        return pb.TokenizationResponse(length=len(ids), tokens=ids)

    @unary
    def Status(self, request: Any, context: Any) -> Any:
        """READY / BUSY / UNINITIALIZED, and memory: RSS and the model file's size."""
        with self._lock:
            loaded, busy = self._loaded, self._busy
        model_file = loaded.file_size if loaded else 0
        return status_reply(
            loaded=loaded is not None, busy=busy, breakdown={"model_file": model_file}
        )

    @unary
    def Free(self, request: Any, context: Any) -> Any:
        """Close the model and give its memory back."""
        with self._model_lock:
            had = self._close()
        if had is None:
            return pb.Result(success=True, message="no model loaded")
        log(f"freed {had.settings.path}")
        return pb.Result(success=True, message=f"freed {had.settings.path}")
