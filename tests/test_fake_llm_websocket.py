"""`streamgate fake-llm`'s Inferneo-style WebSocket endpoint, driven as a real child process
with the real `websockets` client: one JSON request per message, OpenAI chunks one per message
until `finish_reason`, and the SSE endpoint's knobs and faults."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.procs import FakeLLM
from tests.test_fake_llm import chat, post, stats, text_of

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as llm:
        yield llm


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


def ws_url(llm: FakeLLM, path: str = "/v1/chat/completions") -> str:
    return llm.url.replace("http://", "ws://") + path


async def answer(ws) -> list[dict[str, Any]]:
    """One answer's chunks: up to and including the one whose finish_reason is set."""
    chunks = []
    while True:
        chunks.append(json.loads(await ws.recv()))
        if any(c.get("finish_reason") for c in chunks[-1]["choices"]):
            return chunks


async def test_a_request_is_answered_with_one_chunk_per_message_until_finish_reason(llm, http):
    body = chat("hi", fake={"tokens": 5}, stream_options={"include_usage": True})
    async with asyncio.timeout(5), websockets.connect(ws_url(llm)) as ws:
        await ws.send(json.dumps(body))
        chunks = await answer(ws)
        usage = json.loads(await ws.recv())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) == 1 + 5 + 1  # role, five tokens, finish
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert usage["usage"]["completion_tokens"] == 5
    _, events = await post(http, llm, chat("hi", stream=True, fake={"tokens": 5}))
    assert text_of(chunks) == text_of(events)  # the same answer as over SSE


async def test_a_session_answers_its_requests_in_turn(llm):
    async with asyncio.timeout(5), websockets.connect(ws_url(llm)) as ws:
        await ws.send(json.dumps(chat("one", fake={"tokens": 2})))
        await ws.send(json.dumps(chat("two", fake={"tokens": 3})))
        first, second = await answer(ws), await answer(ws)
    assert (len(first), len(second)) == (4, 5)
    assert first[0]["id"] != second[0]["id"]


@pytest.mark.parametrize(("status", "code"), [(503, 1011), (400, 1008)], ids=["5xx", "4xx"])
async def test_a_requested_failure_is_an_error_message_and_a_close(llm, status, code):
    async with asyncio.timeout(5), websockets.connect(ws_url(llm)) as ws:
        await ws.send(json.dumps(chat(fake={"fail_status": status})))
        error = json.loads(await ws.recv())
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert error["error"]["type"] in ("server_error", "invalid_request_error")
    assert closed.value.rcvd.code == code


async def test_a_failure_flag_refuses_the_upgrade():
    async with FakeLLM("--fail-status", "503") as llm:
        with pytest.raises(InvalidStatus) as refused:
            async with asyncio.timeout(5):
                await websockets.connect(ws_url(llm))
    assert refused.value.response.status_code == 503


async def test_stall_after_sends_n_tokens_then_silence(llm, http):
    async with asyncio.timeout(5), websockets.connect(ws_url(llm)) as ws:
        await ws.send(json.dumps(chat(fake={"stall_after": 2})))
        got = [json.loads(await ws.recv()) for _ in range(3)]  # role, two tokens
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await ws.recv()
    assert all(c["choices"][0]["finish_reason"] is None for c in got)
    assert (await stats(http, llm))["stalls_injected"] >= 1


async def test_reset_after_sends_n_tokens_then_drops_the_connection(llm):
    async with asyncio.timeout(5), websockets.connect(ws_url(llm)) as ws:
        await ws.send(json.dumps(chat(fake={"reset_after": 2, "tokens": 50})))
        got = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                got.append(await ws.recv())
    assert len(got) == 3  # role, two tokens
    assert closed.value.rcvd is None  # no close frame: the connection was dropped


async def test_a_client_closing_mid_answer_is_counted_gone_at_once(llm, http):
    before = (await stats(http, llm))["client_gone"]
    async with asyncio.timeout(5):
        ws = await websockets.connect(ws_url(llm))
        await ws.send(json.dumps(chat(fake={"tokens": 1000, "tokens_per_s": 20})))
        await ws.recv()
        closed_at = time.monotonic()
        await ws.close()
        while (now := await stats(http, llm))["client_gone"] == before:
            await asyncio.sleep(0.02)
    assert now["last_client_gone_monotonic"] - closed_at < 0.5


async def test_a_plain_get_is_told_to_post_or_upgrade(llm, http):
    async with http.get(llm.url + "/v1/chat/completions") as response:
        assert response.status == 405
        assert "WebSocket" in (await response.json())["error"]["message"]
