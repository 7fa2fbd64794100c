"""The llama-cpp backend's reading of LocalAI's messages (pure: no llama_cpp needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modeld.llama_backend.params import (
    chat_messages,
    embedding_input,
    load_settings,
    plain_prompt,
    sampling_kwargs,
)
from modeld.rpc import backend_pb2 as pb
from modeld.rpc.client import build_model_options


def test_load_settings_from_a_models_options(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    options = build_model_options(
        str(gguf),
        {"ContextSize": 256, "Threads": 3, "NGPULayers": 99, "Embeddings": True, "Seed": 5},
    )
    settings = load_settings(options)
    assert settings.llama_kwargs() == {
        "model_path": str(gguf),
        "n_ctx": 256,
        "n_threads": 3,
        "n_gpu_layers": 99,
        "embedding": True,
        "use_mmap": True,  # modeld's default: MMap on unless the model says otherwise
        "use_mlock": False,
        "seed": 5,
        "verbose": False,
    }


def test_unset_fields_leave_llama_cpps_defaults(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    kwargs = load_settings(build_model_options(str(gguf), {"MMap": False})).llama_kwargs()
    assert kwargs["n_ctx"] == 0  # the model's own context
    assert kwargs["use_mmap"] is False
    assert "n_threads" not in kwargs and "seed" not in kwargs


def test_relative_model_files_resolve_against_model_path(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    request = pb.ModelOptions(ModelFile="m.gguf", ModelPath=str(tmp_path))
    assert load_settings(request).path == str(tmp_path / "m.gguf")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: "", "no model file given"),
        (lambda d: str(d / "absent.gguf"), "does not exist"),
        (lambda d: str(d), "is not a regular file"),
    ],
)
def test_unusable_model_files_are_named(tmp_path: Path, make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        load_settings(pb.ModelOptions(ModelFile=path))


def test_sampling_maps_openai_parameters() -> None:
    request = pb.PredictOptions(
        Tokens=12,
        Temperature=0.7,
        TopP=0.9,
        TopK=40,
        StopPrompts=["\n\n"],
        Seed=3,
        PresencePenalty=0.5,
        FrequencyPenalty=-0.5,
    )
    kwargs = sampling_kwargs(request)
    assert kwargs.pop("presence_penalty") == pytest.approx(0.5)
    assert kwargs.pop("frequency_penalty") == pytest.approx(-0.5)
    assert kwargs.pop("temperature") == pytest.approx(0.7)
    assert kwargs.pop("top_p") == pytest.approx(0.9)
    assert kwargs == {"max_tokens": 12, "top_k": 40, "stop": ["\n\n"], "seed": 3}


@given(
    tokens=st.integers(-(2**31), 2**31 - 1),
    temperature=st.floats(-10, 10, width=32),
    top_k=st.integers(-(2**31), 2**31 - 1),
)
def test_sampling_never_passes_a_nonsense_value(
    tokens: int, temperature: float, top_k: int
) -> None:
    kwargs = sampling_kwargs(pb.PredictOptions(Tokens=tokens, Temperature=temperature, TopK=top_k))
    assert kwargs["max_tokens"] is None or kwargs["max_tokens"] > 0
    assert kwargs["temperature"] >= 0
    assert kwargs.get("top_k", 1) > 0


def test_a_chat_is_messages_with_the_tokenizer_template() -> None:
    messages = [pb.Message(role="system", content="Be brief."), pb.Message(content="Hi")]
    chat = pb.PredictOptions(Messages=messages, UseTokenizerTemplate=True)
    assert chat_messages(chat) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert chat_messages(pb.PredictOptions(Messages=messages)) is None
    rendered = pb.PredictOptions(Prompt="<x>", Messages=messages, UseTokenizerTemplate=True)
    assert chat_messages(rendered) is None
    assert plain_prompt(pb.PredictOptions(Messages=messages)) == "Be brief.\nHi"
    assert plain_prompt(rendered) == "<x>"


def test_embedding_input_prefers_localais_field() -> None:
    assert embedding_input(pb.PredictOptions(Embeddings="a", Prompt="b")) == "a"
    assert embedding_input(pb.PredictOptions(Prompt="b")) == "b"
