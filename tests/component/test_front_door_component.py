"""The OpenAI front door on a real supervisor and real reference backends (fake systemd).

One front door serves the module; tests that need a model unloaded unload it first. Waits
are on events: the supervisor's status changes (``Front.until``), or what the client
reads. A client that holds a ``parallel`` slot is a streamed request whose client stops
reading: the stream blocks on the full socket, so the slot stays taken until it leaves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from front import Answer, Front, RawStream, fetch, reference_model, request, session

MODELS = {
    "demo": reference_model(),
    "held": reference_model(extra="parallel = 1\nmax_queue = 1\n"),
    "sleepy": reference_model("load_delay=2.5"),
    "broken": reference_model("fail_load=corrupt weights in layer 7"),
    "doomed": reference_model("crash_after=2", "predict_delay=30", extra="parallel = 2\n"),
    "ünï model": reference_model(),
    "orphan": 'backend = "nope"\n',
}
FOREVER = 2**31 - 1


@pytest.fixture(scope="module")
def front() -> Iterator[Front]:
    door = Front(MODELS)
    yield door
    door.close()


def completion(model: str = "demo", **fields: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "The sea", "max_tokens": 6, "temperature": 0, **fields}


def chat(model: str = "demo", **fields: Any) -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Tell me about the lighthouse"},
    ]
    return {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0, **fields}


def events(answer: Answer) -> list[Any]:
    """The ``data:`` events of an SSE answer, decoded ("[DONE]" kept as a string)."""
    out: list[Any] = []
    for line in answer.text.split("\n"):
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def error_of(answer: Answer, status: int, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error of ``answer``, checked for ``status``, shape and ``code``."""
    assert answer.status == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in answer.text
    return dict(error)


def finished(front: Front, route: str) -> list[tuple[str, int]]:
    return front.sync(lambda: [(m, s) for m, r, s, _ in front.metrics.finished if r == route])


# ----------------------------------------------------------------------- models


def test_models_are_listed_and_retrieved(front: Front) -> None:
    listed = fetch(front, "GET", "/v1/models")
    assert listed.status == 200 and listed.body["object"] == "list"
    cards = {card["id"]: card for card in listed.body["data"]}
    assert set(cards) == set(MODELS)
    assert cards["orphan"]["backend"] == "nope"
    assert all(c["object"] == "model" and c["owned_by"] == "modeld" for c in cards.values())
    assert all(isinstance(c["created"], int) and c["created"] > 0 for c in cards.values())
    one = fetch(front, "GET", "/v1/models/%C3%BCn%C3%AF%20model")
    assert one.status == 200 and one.body["id"] == "ünï model"
    assert one.body["state"] == "unloaded"
    error = error_of(fetch(front, "GET", "/v1/models/nope"), 404, "model_not_found")
    assert error["param"] == "model"
    assert ("", 404) in finished(front, "/v1/models/{id}")
    assert ("ünï model", 200) in finished(front, "/v1/models/{id}")


# ----------------------------------------------------------------- generation


def test_a_completion_loads_its_model_on_demand_and_streams_the_same_text(front: Front) -> None:
    front.unload("demo")
    whole = fetch(front, "POST", "/v1/completions", completion())
    assert whole.status == 200, whole.text
    assert whole.body["object"] == "text_completion" and whole.body["model"] == "demo"
    choice = whole.body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"].startswith(" ")
    assert whole.body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}
    assert front.sync(lambda: front.supervisor.status("demo").state.serving)

    streamed = fetch(front, "POST", "/v1/completions", completion(stream=True))
    assert streamed.status == 200
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    chunks = events(streamed)
    assert chunks[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks[:-1])
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == choice["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-2:] == [None, "length"]
    assert not any("usage" in c for c in chunks[:-1])
    assert finished(front, "/v1/completions")[-2:] == [("demo", 200), ("demo", 200)]
    first = front.sync(lambda: front.metrics.first_tokens[-1])
    assert first[:2] == ("demo", "/v1/completions") and 0 < first[2] < 30


def test_stop_strings_end_a_completion_with_reason_stop(front: Front) -> None:
    full = fetch(front, "POST", "/v1/completions", completion(max_tokens=12)).body
    text = full["choices"][0]["text"]
    stop = text.split()[3]
    cut = fetch(front, "POST", "/v1/completions", completion(max_tokens=12, stop=stop)).body
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 12


def test_a_chat_answers_in_a_new_turn_whole_and_streamed(front: Front) -> None:
    whole = fetch(front, "POST", "/v1/chat/completions", chat())
    assert whole.status == 200, whole.text
    assert whole.body["object"] == "chat.completion" and whole.body["id"].startswith("chatcmpl-")
    choice = whole.body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    content = choice["message"]["content"]
    assert content and not content.startswith(" ")
    assert whole.body["usage"]["completion_tokens"] == 6

    options = {"include_usage": True}
    streamed = fetch(
        front, "POST", "/v1/chat/completions", chat(stream=True, stream_options=options)
    )
    chunks = events(streamed)
    assert chunks[-1] == "[DONE]"
    *pieces, closing, last = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert pieces[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(p["choices"][0]["delta"]["content"] for p in pieces) == content
    assert closing["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert all(c["usage"] is None for c in [*pieces, closing])
    assert last["choices"] == [] and last["usage"] == whole.body["usage"]


def test_embeddings_one_vector_per_input_as_floats_or_base64(front: Front) -> None:
    one = fetch(front, "POST", "/v1/embeddings", {"model": "demo", "input": "the sea"})
    assert one.status == 200, one.text
    vector = one.body["data"][0]["embedding"]
    assert len(vector) == 64 and abs(sum(v * v for v in vector) - 1) < 1e-6
    assert one.body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    body = {"model": "demo", "input": ["the sea", "a lamp", "the sea"]}
    many = fetch(front, "POST", "/v1/embeddings", body).body
    vectors = [d["embedding"] for d in many["data"]]
    assert [d["index"] for d in many["data"]] == [0, 1, 2]
    assert vectors[0] == vectors[2] == vector and vectors[1] != vector
    packed = fetch(front, "POST", "/v1/embeddings", {**body, "encoding_format": "base64"}).body
    decoded = [struct.unpack("<64f", base64.b64decode(d["embedding"])) for d in packed["data"]]
    for got, want in zip(decoded, vectors, strict=True):
        assert list(got) == pytest.approx(want, abs=1e-6)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("raw", "headers", "problem"),
    [
        (b"", {}, "empty"),
        (b"{not json", {"Content-Type": "application/json"}, "not valid JSON"),
        (b'{"model": "demo", "prompt": "\xff\xfe"}', {}, "not valid UTF-8"),
        (b'["model"]', {"Content-Type": "text/plain"}, "must be a JSON object"),
    ],
)
def test_bodies_that_are_not_json_objects_get_a_400(
    front: Front, raw: bytes, headers: dict[str, str], problem: str
) -> None:
    error = error_of(fetch(front, "POST", "/v1/completions", raw=raw, headers=headers), 400)
    assert problem in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", completion(max_tokens="many"), "max_tokens"),
        ("/v1/completions", completion(prompt="\udc80"), "prompt"),
        ("/v1/completions", completion(n=2), "n"),
        ("/v1/chat/completions", chat(temperature=9), "temperature"),
        ("/v1/chat/completions", {"model": "demo", "messages": "hi"}, "messages"),
        ("/v1/embeddings", {"model": "demo", "input": 7}, "input"),
        ("/v1/embeddings", {"input": "x"}, "model"),
    ],
)
def test_invalid_parameters_get_a_400_naming_them(
    front: Front, path: str, body: dict[str, Any], param: str
) -> None:
    error = error_of(fetch(front, "POST", path, body), 400)
    assert error["param"] == param
    assert ("", 400) in finished(front, path)


def test_an_empty_body_without_content_type_is_read_as_an_empty_body(front: Front) -> None:
    async def post() -> RawStream:
        reader, writer = await asyncio.open_unix_connection(str(front.socket))
        writer.write(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        stream = RawStream(reader, writer)
        await stream.read_head()
        return stream

    async def scenario() -> tuple[int, str]:
        stream = await post()
        body = await stream.reader.read()
        await stream.close()
        return stream.status, body.decode()

    status, body = asyncio.run(scenario())
    assert status == 400 and "the request body is empty" in json.loads(body)["error"]["message"]


async def raw_exchange(front: Front, head: bytes, chunks: list[bytes]) -> tuple[int, Any]:
    """Send ``head`` then ``chunks`` (as far as the server takes them); the answer."""
    reader, writer = await asyncio.open_unix_connection(str(front.socket))
    writer.write(head)
    with contextlib.suppress(ConnectionError):
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
    stream = RawStream(reader, writer)
    await stream.read_head()
    body = json.loads(await reader.readexactly(int(stream.headers["content-length"])))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    return stream.status, body


def test_a_body_over_the_limit_gets_a_413(front: Front) -> None:
    declared = b"POST /v1/completions HTTP/1.0\r\nHost: m\r\nContent-Length: 9437184\r\n\r\n"
    status, body = asyncio.run(raw_exchange(front, declared, []))
    assert status == 413 and body["error"]["code"] == "too_large"
    assert "8 MiB" in body["error"]["message"]
    chunked = b"POST /v1/completions HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n"
    chunked += b"Connection: close\r\n\r\n"
    mib = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
    status, body = asyncio.run(raw_exchange(front, chunked, [mib] * 9 + [b"0\r\n\r\n"]))
    assert status == 413 and body["error"]["code"] == "too_large"
    just_under = json.dumps({"model": "demo", "prompt": "x" * (8 * 1024 * 1024 - 100)})
    answer = fetch(front, "POST", "/v1/completions", raw=just_under.encode())
    assert answer.status == 200, answer.text
    assert ("", 413) in finished(front, "/v1/completions")


def test_unknown_routes_and_methods_get_openai_errors(front: Front) -> None:
    error = error_of(fetch(front, "POST", "/v1/nothing", {}), 404, "unknown_route")
    assert "POST /v1/nothing" in error["message"]
    error_of(fetch(front, "GET", "/"), 404)
    wrong = fetch(front, "GET", "/v1/chat/completions")
    error_of(wrong, 405, "method_not_allowed")
    assert wrong.headers["Allow"] == "POST"
    error_of(fetch(front, "DELETE", "/v1/models"), 405)


def test_unknown_and_unservable_models(front: Front) -> None:
    unknown = error_of(fetch(front, "POST", "/v1/completions", completion("nope")), 404)
    assert unknown["code"] == "model_not_found" and unknown["param"] == "model"
    orphan = fetch(front, "POST", "/v1/completions", completion("orphan"))
    assert "not installed" in error_of(orphan, 500, "backend_not_installed")["message"]
    broken = fetch(front, "POST", "/v1/chat/completions", chat("broken"))
    assert "corrupt weights in layer 7" in error_of(broken, 503, "load_failed")["message"]
    assert broken.headers["Retry-After"] == "10"
    assert ("", 404) in finished(front, "/v1/completions")
    assert ("broken", 503) in finished(front, "/v1/chat/completions")
    assert fetch(front, "POST", "/v1/completions", completion()).status == 200


def test_a_backend_that_dies_mid_request_is_a_502_or_an_error_event(front: Front) -> None:
    """``doomed`` crashes 2 s after loading, while both requests sit in its predict_delay
    (so the stream has sent a comment by then: its headers are out)."""

    async def both() -> tuple[Answer, Answer]:
        whole, streamed = await asyncio.gather(
            request(front, "POST", "/v1/completions", completion("doomed")),
            request(front, "POST", "/v1/chat/completions", chat("doomed", stream=True)),
        )
        return whole, streamed

    whole, streamed = asyncio.run(both())
    assert "backend error" in error_of(whole, 502, "backend_error")["message"]
    assert streamed.status == 200
    assert ": doomed is reading the prompt" in streamed.text
    error = events(streamed)[-1]["error"]
    assert error["code"] == "backend_error" and error["type"] == "server_error"
    assert "[DONE]" not in streamed.text
    assert ("doomed", 502) in finished(front, "/v1/chat/completions")


# -------------------------------------------------------- loading and backpressure


def test_a_streamed_request_gets_loading_comments_while_its_model_loads(front: Front) -> None:
    front.unload("sleepy")

    async def scenario() -> tuple[RawStream, list[tuple[float, str]]]:
        stream = await RawStream.open(front, "/v1/chat/completions", chat("sleepy", stream=True))
        lines = [(time.monotonic(), "headers")]
        while line := await stream.event_line():
            lines.append((time.monotonic(), line))
        await stream.close()
        return stream, lines

    stream, lines = asyncio.run(scenario())
    assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
    texts = [text for _, text in lines]
    first_data = next(i for i, text in enumerate(texts) if text.startswith("data:"))
    comments = texts[1:first_data]
    assert len(comments) >= 2, texts
    assert all(c.startswith(": loading sleepy …") for c in comments), comments
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(lines[: first_data + 1])]
    assert max(gaps) <= 2.0, gaps
    assert texts[-1] == "data: [DONE]"
    first = front.sync(lambda: front.metrics.first_tokens[-1])
    assert first[0] == "sleepy" and first[2] >= 2.5


def test_a_client_that_leaves_during_a_load_does_not_fail_the_others_waiting(
    front: Front,
) -> None:
    """Requests waiting for one load share it: one leaving must not cancel it for all."""
    front.unload("sleepy")

    async def scenario() -> list[str]:
        body = completion("sleepy", stream=True)
        leaver = await RawStream.send(front, "/v1/completions", body)
        stayer = await RawStream.send(front, "/v1/completions", body)
        await leaver.read_head()
        await stayer.read_head()
        assert (await leaver.event_line()).startswith(": loading sleepy")
        await leaver.close()
        lines = []
        while line := await stayer.event_line():
            lines.append(line)
        await stayer.close()
        return lines

    lines = asyncio.run(scenario())
    assert lines[-1] == "data: [DONE]", lines
    assert sum(1 for line in lines if line.startswith("data: {")) == 7  # 6 tokens + closing
    outcomes = finished(front, "/v1/completions")[-2:]
    assert sorted(outcomes) == [("sleepy", 200), ("sleepy", 499)]


def test_a_full_queue_is_a_429_and_clients_that_leave_free_their_place(front: Front) -> None:
    run_queue_scenario(front)


def test_without_aiohttp_cancellation_the_disconnect_watch_frees_the_queue() -> None:
    """The path taken on aiohttp < 3.9 (Debian 12), which never cancels a handler."""
    door = Front({"held": MODELS["held"]}, native_cancellation=False)
    try:
        run_queue_scenario(door)
    finally:
        door.close()


def run_queue_scenario(front: Front) -> None:
    """``held`` (parallel 1, max_queue 1): A holds the slot, B waits, C is refused; B then
    A go away (B from the queue, A mid-stream); their places are freed and D is served."""

    async def scenario() -> None:
        holder = await RawStream.open(
            front, "/v1/completions", completion("held", stream=True, max_tokens=FOREVER)
        )
        waiting = None
        try:
            assert holder.status == 200
            while not (await holder.event_line()).startswith("data: "):
                pass  # loading comments (the first request loads the model)
            waiting = await RawStream.send(front, "/v1/completions", completion("held"))
            await front.until_async(lambda: front.watch.in_flight("held") == 2)
            assert front.queue("held") == (1, 1)

            refused = await request(front, "POST", "/v1/completions", completion("held"))
            error = error_of(refused, 429, "queue_full")
            assert error["type"] == "rate_limit_error" and refused.headers["Retry-After"] == "1"
            assert "max_queue 1" in error["message"]

            await waiting.close()
            await front.until_async(lambda: front.watch.in_flight("held") == 1)
            assert front.queue("held") == (0, 1)
            await holder.close()
            await front.until_async(lambda: front.watch.in_flight("held") == 0)
            assert front.queue("held") == (0, 0)
        finally:
            for stream in (holder, waiting):
                if stream is not None:
                    await stream.close()

        async with session(front) as client:
            served = await client.post("http://modeld/v1/completions", json=completion("held"))
            assert served.status == 200
            assert (await served.json())["usage"]["completion_tokens"] == 6

    asyncio.run(scenario())
    outcomes = finished(front, "/v1/completions")
    assert ("held", 429) in outcomes
    assert outcomes.count(("held", 499)) == 2
    assert outcomes[-1] == ("held", 200)


def test_a_request_waits_at_most_request_timeout_for_its_model() -> None:
    door = Front({"sleepy": reference_model("load_delay=3")}, daemon='request_timeout = "1s"\n')
    try:

        async def both() -> tuple[Answer, Answer]:
            whole, streamed = await asyncio.gather(
                request(door, "POST", "/v1/completions", completion("sleepy")),
                request(door, "POST", "/v1/completions", completion("sleepy", stream=True)),
            )
            return whole, streamed

        whole, streamed = asyncio.run(both())
        assert "request_timeout" in error_of(whole, 503, "timeout")["message"]
        assert whole.headers["Retry-After"] == "5"
        assert streamed.status == 200 and ": loading sleepy …" in streamed.text
        assert events(streamed)[-1]["error"]["code"] == "timeout"
        door.until(lambda: door.watch.in_flight("sleepy") == 0)
        assert door.queue("sleepy") == (0, 0)
        statuses = door.sync(lambda: [s for _, _, s, _ in door.metrics.finished])
        assert statuses == [503, 503]
    finally:
        door.close()
