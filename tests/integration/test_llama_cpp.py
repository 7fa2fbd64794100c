"""The llama-cpp backend through a real modeld in the sandbox, on GGUF files made here
(tests/ggufgen: seeded random weights, a byte-level BPE tokenizer, a ChatML template).

Clients are the ``openai`` package over the front door and busctl. Needs llama-cpp-python
in this interpreter (scripts/setup installs it); without it the module fails in CI
(MODELD_REQUIRE_LLAMA=1) and is skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from busclient import SignalRecorder, call, connect
from ggufgen import write_model
from openai_client import openai_client
from sandbox import Sandbox
from sandbox.deploy import Modeld, llama_model

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[2]

if os.environ.get("MODELD_REQUIRE_LLAMA") == "1":
    import llama_cpp
else:
    llama_cpp = pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("gguf")
    return {
        "tiny": write_model(directory / "tiny.gguf", preset="tiny", seed=7),
        "large": write_model(directory / "large.gguf", preset="large", seed=7),
    }


@pytest.fixture(scope="module")
def modeld(
    sandbox: Sandbox, gguf: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Modeld]:
    deployment = Modeld(
        sandbox,
        tmp_path_factory.mktemp("modeld-llama"),
        models={
            "tiny": llama_model(gguf["tiny"], ContextSize=256),
            "tiny-embed": llama_model(gguf["tiny"], ContextSize=256, Embeddings=True),
            "large": llama_model(gguf["large"], memory_max="1G", MMap=False, ContextSize=128),
            "large-cramped": llama_model(
                gguf["large"], memory_max="128M", MMap=False, ContextSize=128
            ),
        },
    )
    with deployment.deployed():
        yield deployment


@pytest.fixture
def client(modeld: Modeld) -> Iterator[openai.OpenAI]:
    with openai_client(modeld) as client:
        yield client


def test_completions_whole_and_streamed_through_the_front_door(
    modeld: Modeld, client: openai.OpenAI
) -> None:
    whole = client.completions.create(model="tiny", prompt="The sea", max_tokens=12, temperature=0)
    assert modeld.prop("tiny", "State") == "ready"
    text = whole.choices[0].text
    assert text and text.isprintable()
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens > 0

    stream = client.completions.create(
        model="tiny", prompt="The sea", max_tokens=12, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == text
    other = client.completions.create(
        model="tiny", prompt="A mountain of numbers", max_tokens=12, temperature=0
    )
    assert other.choices[0].text != text  # the output depends on the prompt


def test_chat_uses_the_ggufs_template_whole_and_streamed(
    modeld: Modeld, client: openai.OpenAI
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What does a lighthouse do?"},
    ]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=8, temperature=0
    )
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content
    assert "<|im_start|>" not in answer.content
    assert whole.usage is not None and whole.usage.completion_tokens == 8
    # the prompt the backend saw is the ChatML rendering, longer than the bare contents
    bare = len(llama_tokens(modeld, "You answer briefly.\nWhat does a lighthouse do?"))
    assert whole.usage.prompt_tokens > bare

    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer.content
    assert chunks[-1].choices[0].finish_reason == "length"


def llama_tokens(modeld: Modeld, text: str) -> list[int]:
    """Tokenize with llama.cpp in this process, on the same GGUF (vocabulary only)."""
    path = modeld.models_dir / "tiny.toml"
    gguf_file = next(
        line.split('"')[1] for line in path.read_text().splitlines() if line.startswith("model")
    )
    vocab = llama_cpp.Llama(model_path=gguf_file, vocab_only=True, verbose=False)
    try:
        return list(vocab.tokenize(text.encode("utf-8"), add_bos=False))
    finally:
        vocab.close()


def test_embeddings_are_unit_vectors_that_depend_on_the_text(
    modeld: Modeld, client: openai.OpenAI
) -> None:
    result = client.embeddings.create(
        model="tiny-embed", input=["a lighthouse on a cliff", "tax forms"]
    )
    first, second = (item.embedding for item in result.data)
    assert len(first) == len(second) == 64  # the tiny preset's embedding width
    assert math.isclose(math.fsum(x * x for x in first), 1.0, rel_tol=1e-3)
    assert first != second
    expected = len(llama_tokens(modeld, "a lighthouse on a cliff")) + len(
        llama_tokens(modeld, "tax forms")
    )
    assert result.usage.prompt_tokens == expected  # TokenizeString of the backend

    with pytest.raises(openai.APIStatusError) as refused:
        client.embeddings.create(model="tiny", input="no embeddings here")
    assert "Embeddings = true" in str(refused.value)


def test_memory_holds_the_weights_and_the_peak_is_learned(modeld: Modeld) -> None:
    size = (modeld.models_dir / "large.toml").read_text()  # the file is ~300 MB
    assert "MMap = false" in size
    modeld.load("large")
    assert modeld.prop("large", "MemoryCurrent") >= 280 * 1024 * 1024
    modeld.unload("large")
    assert modeld.leftovers("large") == []
    peak = modeld.prop("large", "MemoryPeak")  # learned from the scope as it went
    assert 280 * 1024 * 1024 <= peak <= 1024 * 1024 * 1024


def test_a_model_larger_than_its_limit_fails_as_oom_with_nothing_left(modeld: Modeld) -> None:
    async def scenario() -> tuple[str, list[str]]:
        async with connect(modeld.sandbox.bus_address) as bus:
            from dbus_next.signature import Variant

            recorder = await SignalRecorder(bus).start()
            reply = await call(
                bus, "Load", "sa{sv}", ["large-cramped", {"wait": Variant("b", True)}]
            )
            await recorder.wait_for(lambda: recorder.unloaded("large-cramped"))
            return reply.error_name or "", recorder.unloaded("large-cramped")

    error, reasons = asyncio.run(scenario())
    assert error == "org.modeld1.Error.LoadFailed"
    assert reasons == ["oom"]
    assert "exceeding its memory limit (128.0 MiB)" in modeld.prop("large-cramped", "LastError")
    assert modeld.leftovers("large-cramped") == []


def test_modeldctl_backends_lists_llama_cpp_as_available_here(modeld: Modeld) -> None:
    listed = _backends_json(sys.executable, modeld)
    assert listed["llama-cpp"]["available"] is True
    assert listed["llama-cpp"]["models"] == ["large", "large-cramped", "tiny", "tiny-embed"]


def _backends_json(python: str, modeld: Modeld) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "service")}
    config = modeld.config_dir / "modeld.toml"
    proc = subprocess.run(
        [python, "-m", "modeld.cli.main", "--json", "backends", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return {b["name"]: b for b in json.loads(proc.stdout)["backends"]}


@pytest.fixture(scope="module")
def modeld_without_llama(
    sandbox: Sandbox, gguf: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Modeld]:
    """modeld on Debian's python3, which has no llama-cpp-python."""
    deployment = Modeld(
        sandbox,
        tmp_path_factory.mktemp("modeld-no-llama"),
        models={"tiny": llama_model(gguf["tiny"])},
        python="/usr/bin/python3",
    )
    with deployment.deployed():
        yield deployment


def test_without_llama_cpp_python_a_load_fails_at_once_saying_how_to_install(
    modeld_without_llama: Modeld,
) -> None:
    modeld = modeld_without_llama
    assert _backends_json("/usr/bin/python3", modeld)["llama-cpp"]["available"] is False
    proc = modeld.load("tiny", check=False)
    assert proc.returncode != 0
    assert "NoSuchBackend" in proc.stderr or "cannot run here" in proc.stderr
    assert "pip install 'modeld[llama-cpp]'" in proc.stderr
    assert modeld.prop("tiny", "State") == "unloaded"
    assert modeld.scopes() == []
