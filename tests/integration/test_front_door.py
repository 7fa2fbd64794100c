"""The OpenAI front door of modeld as a real unit, used by clients nobody here wrote: the
``openai`` package (over httpx2's unix-socket transport) and ``curl --unix-socket``.

The module runs twice: on this checkout's interpreter, and on Debian's /usr/bin/python3
with its python3-aiohttp (3.8, which never cancels a handler when its client goes away,
so there modeld's own disconnect watch frees the queue). Waits are on D-Bus signals
(InFlight, State) or on what the clients read, never on timers.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from busclient import SignalRecorder, connect
from openai_client import openai_client
from sandbox import Sandbox
from sandbox.deploy import Modeld, reference_model

pytestmark = pytest.mark.systemd

MODELS = {
    "chat": reference_model(),
    "slow": reference_model(options=("load_delay=3",)),
    "held": reference_model(extra="parallel = 1\nmax_queue = 1\n"),
    "broken": reference_model(options=("fail_load=corrupt weights in layer 7",)),
}
RUNTIMES = {"checkout": sys.executable, "debian": "/usr/bin/python3"}


@pytest.fixture(scope="module", params=list(RUNTIMES))
def modeld(
    request: pytest.FixtureRequest, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Modeld]:
    deployment = Modeld(
        sandbox,
        tmp_path_factory.mktemp(f"modeld-front-{request.param}"),
        models=dict(MODELS),
        python=RUNTIMES[request.param],
    )
    with deployment.deployed():
        yield deployment


@pytest.fixture
def client(modeld: Modeld) -> Iterator[openai.OpenAI]:
    with openai_client(modeld) as client:
        yield client


def curl(modeld: Modeld, *args: str) -> str:
    proc = modeld.sandbox.exec(
        "curl", "-sS", "--max-time", "60", "--unix-socket", str(modeld.api_socket), *args
    )
    return str(proc.stdout)


def curl_post(modeld: Modeld, path: str, body: dict[str, Any], *args: str) -> str:
    """POST with ``curl -d`` as people type it: no JSON Content-Type (curl says form data)."""
    return curl(modeld, *args, "-d", json.dumps(body), f"http://modeld{path}")


def split_response(out: str) -> tuple[str, dict[str, str], Any]:
    """curl -i output: (status line, headers, decoded JSON body)."""
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    status, *lines = head.split("\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return status, headers, json.loads(body)


def test_the_openai_client_on_a_model_loaded_on_demand(
    modeld: Modeld, client: openai.OpenAI
) -> None:
    assert modeld.prop("chat", "State") == "unloaded"
    whole = client.completions.create(model="chat", prompt="The sea", max_tokens=5, temperature=0)
    assert modeld.prop("chat", "State") == "ready"
    assert modeld.prop("chat", "LoadCount") == 1
    assert [u for u in modeld.scopes() if "chat" in u]
    text = whole.choices[0].text
    assert text.strip() and whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    assert whole.model == "chat" and whole.object == "text_completion"

    stream = client.completions.create(
        model="chat", prompt="The sea", max_tokens=5, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == text and len(pieces) >= 5


def test_the_openai_client_chats_whole_and_streamed(modeld: Modeld, client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What does a lighthouse do?"},
    ]
    whole = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=8, temperature=0, seed=1
    )
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content and not answer.content.startswith(" ")
    assert whole.usage is not None and whole.usage.completion_tokens == 8

    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=messages,
            max_tokens=8,
            temperature=0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == answer.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    )


def test_the_openai_client_embeds(modeld: Modeld, client: openai.OpenAI) -> None:
    packed = client.embeddings.create(model="chat", input=["the sea", "a lamp", "the sea"])
    vectors = [d.embedding for d in packed.data]
    assert [len(v) for v in vectors] == [64, 64, 64]
    assert vectors[0] == vectors[2] != vectors[1]
    floats = client.embeddings.create(model="chat", input="a lamp", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[1], abs=1e-6)
    assert floats.usage.prompt_tokens == 2


def test_the_openai_client_sees_openai_errors(modeld: Modeld, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}], n=2
        )
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as hot:
        client.completions.create(model="chat", prompt="x", temperature=7)
    assert hot.value.param == "temperature"
    with pytest.raises(openai.InternalServerError) as broken:
        client.completions.create(model="broken", prompt="x")
    assert broken.value.status_code == 503
    assert "corrupt weights in layer 7" in broken.value.message


def test_curl_shows_loading_comments_while_a_model_loads(modeld: Modeld) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    out = curl_post(modeld, "/v1/chat/completions", body, "-N")
    lines = [line for line in out.split("\n") if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 2 and all(
        line.startswith(": loading slow …") for line in lines[:first_data]
    ), lines
    assert lines[-1] == "data: [DONE]"
    assert modeld.prop("slow", "State") == "ready"


def test_curl_sees_503_with_retry_after(modeld: Modeld) -> None:
    out = curl_post(modeld, "/v1/completions", {"model": "broken", "prompt": "x"}, "-i")
    status, headers, body = split_response(out)
    assert status.startswith("HTTP/1.1 503")
    assert 1 <= int(headers["Retry-After"]) <= 10  # the failure cooldown's remaining wait
    error = body["error"]
    assert error["code"] == "load_failed" and "corrupt weights" in error["message"]


async def _open(modeld: Modeld, body: dict[str, Any]) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_unix_connection(str(modeld.api_socket))
    payload = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.0\r\nContent-Length: {len(payload)}\r\n\r\n"
    writer.write(head.encode() + payload)
    await writer.drain()
    return reader, writer


def test_curl_sees_429_and_clients_that_leave_free_their_place(modeld: Modeld) -> None:
    """``held`` (parallel 1, max_queue 1): a streamed request whose client stops reading
    holds the slot, a second waits, curl is refused; then both leave without a word."""
    path = modeld.model_path("held")

    async def scenario() -> tuple[str, list[int]]:
        async with connect(modeld.sandbox.bus_address) as bus:
            recorder = await SignalRecorder(bus).start()

            def in_flight() -> list[int]:
                return [
                    body[1]["InFlight"].value
                    for signal_path, member, body in recorder.signals
                    if signal_path == path
                    and member == "PropertiesChanged"
                    and "InFlight" in body[1]
                ]

            big = {"model": "held", "prompt": "The sea", "max_tokens": 2**31 - 1, "stream": True}
            holder, holder_writer = await _open(modeld, big)
            while not (await holder.readline()).startswith(b"data: "):
                pass
            _waiter, waiter_writer = await _open(modeld, {"model": "held", "prompt": "x"})
            await recorder.wait_for(lambda: in_flight()[-1:] == [2])
            refused = await asyncio.to_thread(
                curl_post, modeld, "/v1/completions", {"model": "held", "prompt": "x"}, "-i"
            )
            waiter_writer.close()
            await recorder.wait_for(lambda: in_flight()[-1:] == [1])
            holder_writer.close()
            await recorder.wait_for(lambda: in_flight()[-1:] == [0])
            return refused, in_flight()

    refused, seen = asyncio.run(scenario())
    status, headers, body = split_response(refused)
    assert status.startswith("HTTP/1.1 429") and headers["Retry-After"] == "1"
    assert body["error"]["code"] == "queue_full"
    assert seen[-3:] == [2, 1, 0]
    served = curl_post(modeld, "/v1/completions", {"model": "held", "prompt": "The sea"})
    assert json.loads(served)["choices"][0]["text"]
