"""`streamgate fake-llm`, driven as a real child process over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio

from tests.support.procs import FakeLLM

pytestmark = pytest.mark.asyncio(loop_scope="module")

WORKER_ENV = {"FAKE_LLM_COLOUR": "blue", "CUDA_VISIBLE_DEVICES": "1", "UNRELATED_VAR": "x"}
CONTENT_MARK = b'"delta":{"content":'  # a content delta; the role delta starts with "role"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM("--model", "listed-model", env=WORKER_ENV) as llm:
        yield llm


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@contextlib.asynccontextmanager
async def worker(shared: FakeLLM, flags: list[str]) -> AsyncIterator[FakeLLM]:
    """The shared worker when per-request overrides suffice; a fresh one to test flags."""
    if not flags:
        yield shared
        return
    async with FakeLLM(*flags) as llm:
        yield llm


def chat(content: str = "hello", *, model: str = "m-1", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def post(
    http: aiohttp.ClientSession, llm: FakeLLM, body: Any, path: str = "/v1/chat/completions"
) -> tuple[aiohttp.ClientResponse, list[Any]]:
    """POST, then the SSE `data:` payloads (JSON-decoded; "[DONE]" as is) or the JSON body."""
    async with http.post(llm.url + path, json=body) as response:
        if response.content_type != "text/event-stream":
            return response, [await response.json()]
        events = []
        async for line in response.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
        return response, events


def raw_exchange(port: int, body: dict[str, Any], silence_s: float) -> tuple[bytes, str]:
    """Every byte of one exchange on a plain socket, and how it ended: eof, reset or silent.

    A blocking socket hands over what arrived before an RST; asyncio's readers raise first.
    """
    payload = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: fake\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=silence_s) as sock:
        sock.sendall(head.encode() + payload)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            return bytes(received), "reset"
        except TimeoutError:
            return bytes(received), "silent"
    return bytes(received), "eof"


async def stats(http: aiohttp.ClientSession, llm: FakeLLM) -> dict[str, Any]:
    async with http.get(llm.url + "/debug/stats") as response:
        return await response.json()


def text_of(events: list[Any]) -> str:
    chunks = [e for e in events if e != "[DONE]" and e["choices"]]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in chunks)


async def test_announces_exactly_one_listening_line(llm: FakeLLM) -> None:
    assert llm.stdout_lines == [f"fake-llm listening on http://127.0.0.1:{llm.port}\n"]


async def test_chat_stream_is_role_then_content_then_finish_then_done(llm, http) -> None:
    response, events = await post(http, llm, chat(stream=True, fake={"tokens": 5}))

    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    role, *contents, finish, done = events
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""},
         "logprobs": None, "finish_reason": None}
    ]
    assert len(contents) == 5
    assert all(list(c["choices"][0]["delta"]) == ["content"] for c in contents)
    assert all(c["choices"][0]["delta"]["content"].endswith(" ") for c in contents)
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert done == "[DONE]"
    assert {e["object"] for e in events[:-1]} == {"chat.completion.chunk"}
    assert {e["model"] for e in events[:-1]} == {"m-1"}
    assert len({e["id"] for e in events[:-1]}) == 1


async def test_chat_stream_writes_each_event_as_its_own_http_chunk(llm) -> None:
    body = chat(stream=True, stream_options={"include_usage": True}, fake={"tokens": 5})
    received, ending = await asyncio.to_thread(raw_exchange, llm.port, body, 5.0)

    assert ending == "eof"
    chunks = http_chunks(received.partition(b"\r\n\r\n")[2])
    assert len(chunks) == 1 + 5 + 1 + 1 + 1
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
    assert all(c.count(b"\n\n") == 1 for c in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"


def http_chunks(body: bytes) -> list[bytes]:
    """The payloads of a chunked transfer-encoded body, without the final empty chunk."""
    chunks = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return chunks
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


async def test_completions_stream_has_text_chunks_and_no_role_preamble(llm, http) -> None:
    body = {"model": "m-1", "prompt": "once upon", "stream": True, "fake": {"tokens": 3}}
    _, events = await post(http, llm, body, "/v1/completions")

    *tokens, finish, done = events
    assert [e["object"] for e in tokens] == ["text_completion"] * 3
    assert all(e["choices"][0]["text"].endswith(" ") for e in tokens)
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert done == "[DONE]"


async def test_include_usage_adds_a_usage_chunk_before_done(llm, http) -> None:
    body = chat(stream=True, stream_options={"include_usage": True}, fake={"tokens": 4})
    _, events = await post(http, llm, body)

    *_, finish, usage, done = events
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 4
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 4
    assert done == "[DONE]"


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        pytest.param(chat("hi"), chat("hi"), True, id="same-request"),
        pytest.param(chat("hi"), chat("hi", fake={"tokens_per_s": 500}), True, id="knobs-aside"),
        pytest.param(chat("hi"), chat("bye"), False, id="other-prompt"),
        pytest.param(chat("hi"), chat("hi", model="m-2"), False, id="other-model"),
    ],
)
async def test_token_text_depends_only_on_model_and_prompt(llm, http, first, second, same):
    _, a = await post(http, llm, {**first, "stream": True})
    _, b = await post(http, llm, {**second, "stream": True})
    assert (text_of(a) == text_of(b)) is same
    assert (a[0]["id"] == b[0]["id"]) is same


async def test_more_tokens_extend_the_same_text(llm, http) -> None:
    _, [short] = await post(http, llm, chat("prefix", fake={"tokens": 4}))
    _, [long] = await post(http, llm, chat("prefix", fake={"tokens": 9}))
    short_text = short["choices"][0]["message"]["content"]
    assert long["choices"][0]["message"]["content"].startswith(short_text)


async def test_unary_text_is_the_streamed_text(llm, http) -> None:
    _, streamed = await post(http, llm, chat("same", stream=True))
    _, [unary] = await post(http, llm, chat("same"))
    assert unary["choices"][0]["message"]["content"] == text_of(streamed)


async def test_unary_chat_is_a_chat_completion_with_usage(llm, http) -> None:
    response, [body] = await post(http, llm, chat(fake={"tokens": 7}))

    assert response.status == 200
    assert body["object"] == "chat.completion"
    assert body["model"] == "m-1"
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 7
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 7 and usage["prompt_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_unary_completion_is_a_text_completion(llm, http) -> None:
    body = {"prompt": "once upon", "fake": {"tokens": 3}}
    _, [answer] = await post(http, llm, body, "/v1/completions")

    assert answer["object"] == "text_completion"
    assert answer["model"] == "fake-llm"  # no model in the request
    assert len(answer["choices"][0]["text"].split()) == 3
    assert answer["usage"]["completion_tokens"] == 3


async def test_max_tokens_caps_the_answer_with_finish_reason_length(llm, http) -> None:
    _, [body] = await post(http, llm, chat(max_tokens=2, fake={"tokens": 10}))
    assert len(body["choices"][0]["message"]["content"].split()) == 2
    assert body["choices"][0]["finish_reason"] == "length"


async def test_ttft_delays_the_first_content_token_not_the_role_delta(llm, http) -> None:
    started = time.monotonic()
    body = chat(stream=True, fake={"ttft": 0.3, "tokens": 2})
    async with http.post(llm.url + "/v1/chat/completions", json=body) as response:
        role = await response.content.readuntil(b"\n\n")
        role_s = time.monotonic() - started
        first = await response.content.readuntil(b"\n\n")
        first_s = time.monotonic() - started

    assert b'"role":"assistant"' in role and CONTENT_MARK in first
    assert role_s < 0.2
    assert first_s >= 0.3


async def test_tokens_per_s_paces_the_stream(llm, http) -> None:
    started = time.monotonic()
    _, events = await post(http, llm, chat(stream=True, fake={"tokens": 11, "tokens_per_s": 50}))
    elapsed = time.monotonic() - started

    assert len(events) == 1 + 11 + 1 + 1
    assert 0.2 <= elapsed < 1.5  # ten gaps of 20 ms after the first token


async def test_flags_set_the_defaults_and_requests_override_them(http) -> None:
    async with FakeLLM("--ttft", "0.25", "--tokens", "3", "--tokens-per-s", "1000") as llm:
        started = time.monotonic()
        _, by_flags = await post(http, llm, chat(stream=True))
        flags_s = time.monotonic() - started
        started = time.monotonic()
        _, overridden = await post(http, llm, chat(stream=True, fake={"ttft": 0, "tokens": 6}))
        overridden_s = time.monotonic() - started

    assert len(by_flags) == 1 + 3 + 1 + 1 and flags_s >= 0.25
    assert len(overridden) == 1 + 6 + 1 + 1 and overridden_s < 0.25


FAILURES = [
    pytest.param(
        ["--fail-status", "400", "--error-code", "context_length_exceeded"], None,
        400, "context_length_exceeded", None, id="flags-400-context-length",
    ),
    pytest.param(
        ["--fail-status", "503", "--retry-after", "3"], None, 503, None, "3", id="flags-503",
    ),
    pytest.param(
        [], {"fail_status": 429, "error_code": "rate_limit_exceeded", "retry_after": 2},
        429, "rate_limit_exceeded", "2", id="override-429",
    ),
]


@pytest.mark.parametrize(("flags", "fake", "status", "code", "retry_after"), FAILURES)
async def test_fail_status_answers_with_an_openai_error(
    llm, http, flags, fake, status, code, retry_after
) -> None:
    async with worker(llm, flags) as llm:
        for stream in (True, False):
            response, [body] = await post(http, llm, chat(stream=stream, fake=fake))

            assert response.status == status
            assert response.headers.get("Retry-After") == retry_after
            assert body["error"]["code"] == code
            assert body["error"]["message"] and body["error"]["type"]


STALLS = [
    pytest.param(["--stall-after", "3"], None, 3, id="flag-after-3"),
    pytest.param([], {"stall_after": 2}, 2, id="override-after-2"),
    pytest.param([], {"stall_after": 0}, 0, id="override-before-content"),
]


@pytest.mark.parametrize(("flags", "fake", "sent"), STALLS)
async def test_stall_after_sends_n_content_tokens_then_holds_the_connection_open(
    llm, flags, fake, sent
) -> None:
    async with worker(llm, flags) as llm:
        body = chat(stream=True, fake=fake)
        received, ending = await asyncio.to_thread(raw_exchange, llm.port, body, 0.3)

    assert ending == "silent"
    assert b'"role":"assistant"' in received
    assert received.count(CONTENT_MARK) == sent
    assert b"[DONE]" not in received


RESETS = [
    pytest.param(["--reset-after", "4"], None, 4, id="flag-after-4"),
    pytest.param([], {"reset_after": 5, "tokens": 5000}, 5, id="override-after-5"),
    pytest.param([], {"reset_after": 0}, 0, id="override-before-content"),
    pytest.param([], {"reset_after": 3, "stall_after": 6}, 3, id="reset-before-stall"),
]


@pytest.mark.parametrize(("flags", "fake", "sent"), RESETS)
async def test_reset_after_sends_n_content_tokens_then_a_tcp_rst(llm, flags, fake, sent) -> None:
    async with worker(llm, flags) as llm:
        body = chat(stream=True, fake=fake)
        received, ending = await asyncio.to_thread(raw_exchange, llm.port, body, 5.0)

    assert ending == "reset"  # an RST, not a FIN
    assert received.count(CONTENT_MARK) == sent
    assert b"[DONE]" not in received


@pytest.mark.parametrize(
    ("fake", "ending"),
    [
        pytest.param({"reset_after": 0}, "reset", id="reset-before-headers"),
        pytest.param({"reset_after": 2}, "reset", id="reset-mid-body"),
        pytest.param({"stall_after": 2}, "silent", id="stall-mid-body"),
        pytest.param({"cut_after": 2}, "eof", id="cut-mid-body"),
    ],
)
async def test_unary_faults_leave_a_truncated_or_missing_body(llm, fake, ending) -> None:
    received, how = await asyncio.to_thread(raw_exchange, llm.port, chat(fake=fake), 0.3)

    assert how == ending
    if fake.get("reset_after") == 0:
        assert received == b""
    else:
        head, _, body = received.partition(b"\r\n\r\n")
        declared = int(re.search(rb"Content-Length: (\d+)", head)[1])
        assert 0 < len(body) < declared


async def test_stall_and_reset_past_the_last_token_never_fire(llm, http) -> None:
    _, events = await post(http, llm, chat(stream=True, fake={"tokens": 3, "stall_after": 3}))
    assert events[-1] == "[DONE]"
    _, events = await post(http, llm, chat(stream=True, fake={"tokens": 3, "reset_after": 9}))
    assert events[-1] == "[DONE]"


CUTS = [
    pytest.param(["--cut-after", "4"], None, 4, id="flag-after-4"),
    pytest.param([], {"cut_after": 2}, 2, id="override-after-2"),
]


@pytest.mark.parametrize(("flags", "fake", "sent"), CUTS)
async def test_cut_after_ends_the_stream_cleanly_with_no_finish_and_no_done(
    llm, flags, fake, sent
) -> None:
    async with worker(llm, flags) as llm:
        body = chat(stream=True, fake=fake)
        received, ending = await asyncio.to_thread(raw_exchange, llm.port, body, 5.0)

    assert ending == "eof"  # a clean end (the chunked body's last chunk, then FIN)
    assert received.endswith(b"0\r\n\r\n")
    assert received.count(CONTENT_MARK) == sent
    assert b"[DONE]" not in received and b'"finish_reason":"stop"' not in received


def with_prefill(body: dict[str, Any], text: str) -> dict[str, Any]:
    return {**body, "messages": [*body["messages"], {"role": "assistant", "content": text}]}


@pytest.mark.parametrize("cut", [0, 1, 9, 10, 23], ids=lambda n: f"prefix-{n}-chars")
async def test_a_prefill_is_continued_with_exactly_the_rest_of_the_answer(llm, http, cut) -> None:
    _, whole = await post(http, llm, chat("go on", stream=True))
    answer = text_of(whole)
    # cut 1, 9 and 23 fall inside a token: the rest of that token comes first
    _, rest = await post(http, llm, with_prefill(chat("go on", stream=True), answer[:cut]))

    assert text_of(rest) == answer[cut:]
    assert rest[-1] == "[DONE]"
    assert rest[0]["id"] != whole[0]["id"]  # another request, another id


async def test_a_prefill_the_answer_does_not_begin_with_is_ignored(llm, http) -> None:
    _, whole = await post(http, llm, chat("go on", stream=True))
    _, other = await post(http, llm, with_prefill(chat("go on", stream=True), "zzz "))
    assert text_of(other) == text_of(whole)


@pytest.mark.parametrize(
    ("flags", "fake"),
    [
        pytest.param(["--prefill", "refuse"], None, id="flag"),
        pytest.param([], {"prefill": "refuse"}, id="override"),
    ],
)
async def test_prefill_refuse_answers_400_to_a_final_assistant_message(
    llm, http, flags, fake
) -> None:
    async with worker(llm, flags) as llm:
        refused, [error] = await post(http, llm, with_prefill(chat(fake=fake), "the "))
        plain, events = await post(http, llm, chat(stream=True, fake=fake))

    assert refused.status == 400 and error["error"]["code"] == "prefill_unsupported"
    assert plain.status == 200 and events[-1] == "[DONE]"


async def test_another_seed_gives_another_answer(llm, http) -> None:
    _, a = await post(http, llm, chat("same", stream=True))
    _, b = await post(http, llm, chat("same", stream=True, fake={"seed": 7}))
    _, c = await post(http, llm, chat("same", stream=True, fake={"seed": 7}))
    assert text_of(a) != text_of(b) == text_of(c)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"not json", "invalid request", id="not-json"),
        pytest.param(b"[1, 2]", "JSON object", id="not-an-object"),
        pytest.param(b'{"fake": {"ttfb": 1}}', "unknown 'fake' key 'ttfb'", id="unknown-knob"),
        pytest.param(b'{"fake": {"tokens": -1}}', "fake.tokens", id="negative-knob"),
        pytest.param(b'{"fake": {"ttft": "1s"}}', "fake.ttft", id="knob-not-a-number"),
    ],
)
async def test_malformed_requests_get_a_400_openai_error(llm, http, data, message) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(llm.url + "/v1/chat/completions", data=data, headers=headers) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert message in body["error"]["message"]


async def test_unknown_path_is_a_404_json_error(llm, http) -> None:
    async with http.get(llm.url + "/v1/nothing-here") as response:
        body = await response.json()
    assert response.status == 404
    assert "/v1/nothing-here" in body["error"]["message"]


async def test_models_lists_the_configured_model(llm, http) -> None:
    async with http.get(llm.url + "/v1/models") as response:
        body = await response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["listed-model"]


async def test_health_is_ok(llm, http) -> None:
    async with http.get(llm.url + "/health") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


async def test_debug_env_shows_the_workers_own_environment(llm, http) -> None:
    async with http.get(llm.url + "/debug/env") as response:
        body = await response.json()
    assert body["pid"] == llm.proc.pid
    assert body["env"]["FAKE_LLM_COLOUR"] == "blue"
    assert body["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert all(k.startswith("FAKE_LLM_") or k == "CUDA_VISIBLE_DEVICES" for k in body["env"])
    assert body["argv"][-2:] == ["--model", "listed-model"]


async def test_debug_stats_count_requests_and_completed_streams(llm, http) -> None:
    before = await stats(http, llm)
    await post(http, llm, chat(stream=True))
    await post(http, llm, chat())
    after = await stats(http, llm)

    path = "/v1/chat/completions"
    assert after["requests"][path] - before["requests"].get(path, 0) == 2
    assert after["completions_started"] - before["completions_started"] == 2
    assert after["streams_completed"] - before["streams_completed"] == 1
    assert after["unary_completed"] - before["unary_completed"] == 1
    assert after["open_connections"] >= 1  # this session's keep-alive connection


async def test_debug_stats_record_when_a_client_leaves_mid_stream(llm, http) -> None:
    before = await stats(http, llm)
    body = chat(stream=True, fake={"tokens": 1000, "tokens_per_s": 100})
    response = await http.post(llm.url + "/v1/chat/completions", json=body)
    await response.content.readuntil(b"\n\n")  # the role delta
    await response.content.readuntil(b"\n\n")  # a content token: mid-stream
    left_at = time.monotonic()
    response.close()  # closes the connection, not back to the pool

    after = before
    deadline = time.monotonic() + 5.0
    while after["client_gone"] == before["client_gone"] and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        after = await stats(http, llm)

    assert after["client_gone"] == before["client_gone"] + 1
    assert after["streams_completed"] == before["streams_completed"]
    assert after["completions_active"] == before["completions_active"]
    # CLOCK_MONOTONIC is system-wide: the worker's timestamp compares with ours
    assert 0 <= after["last_client_gone_monotonic"] - left_at < 1.0
    assert after["client_gone_monotonic"][-1] == after["last_client_gone_monotonic"]


async def test_openai_client_streams_a_chat_completion(llm) -> None:
    client = openai.AsyncOpenAI(base_url=llm.url + "/v1", api_key="x", max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model="gpt-fake", messages=[{"role": "user", "content": "hello"}], stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 16
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert {c.model for c in chunks} == {"gpt-fake"}


async def test_sigterm_ends_the_worker_promptly_even_with_a_stalled_stream() -> None:
    llm = FakeLLM()
    await llm.start()
    body = chat(stream=True, fake={"stall_after": 1})
    exchange = asyncio.create_task(asyncio.to_thread(raw_exchange, llm.port, body, 10.0))
    async with aiohttp.ClientSession() as http, asyncio.timeout(5):
        while (await stats(http, llm))["stalls_injected"] == 0:  # until the stream stalls
            await asyncio.sleep(0.01)

    started = time.monotonic()
    assert await llm.stop() == 0
    assert time.monotonic() - started < 2.0
    _, ending = await exchange
    assert ending in ("eof", "reset")
