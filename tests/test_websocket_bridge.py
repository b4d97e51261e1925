"""HTTP clients bridged to WebSocket upstreams (`routes[].websocket_upstream`), over real
sockets: the real `openai` client against the fake-llm's Inferneo-style endpoint (real
processes), a plain HTTP client against a Mullama-style one. The answer is SSE, one event per
upstream message; the end message ends it cleanly, anything else with `event: error`."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.conftest import config_yaml, http_upstream
from tests.support.procs import FakeLLM
from tests.test_admission import gauges_return_to_zero
from tests.test_websocket import SLOTS, WsUpstream

INFERNEO = "websocket_upstream: {}\nlimits: [slots]\n"  # answer_end: finish_reason by default
MULLAMA = (
    "websocket_upstream: {answer_end: {match: {type: done}}, done_event: false}\n"
    "limits: [slots]\ntimeouts: {chunk_gap: 300ms}\n"
)
MESSAGES = [{"role": "user", "content": "tell me something"}]


async def collect(client: openai.AsyncOpenAI) -> tuple[str, list[str | None]]:
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    parts, finishes = [], []
    async for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
    return "".join(parts), finishes


async def test_openai_client_streams_from_an_inferneo_style_websocket_upstream(
    start_gateway, client
):
    async with FakeLLM("--tokens", "6") as llm:
        gw = await start_gateway(config_yaml(llm.url, route=INFERNEO, top=SLOTS))
        direct = openai.AsyncOpenAI(base_url=llm.url + "/v1", api_key="x")  # its SSE endpoint
        bridged = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x")
        text, finishes = await collect(bridged)
        assert (text, finishes) == await collect(direct)  # the same answer, the same chunks
        assert finishes[-1] == "stop"
        async with client.get(llm.url + "/debug/stats") as resp:
            assert (await resp.json())["ws_sessions"] == 1  # it did go over WebSocket
        await direct.close()
        await bridged.close()
    await gauges_return_to_zero(client, gw, "slots")


async def sse_events(client, gw, body: dict) -> tuple[int, list[tuple[str, str]]]:
    """POST, then each event as (event type, data)."""
    async with client.post(gw.url + "/v1/generate", json=body) as resp:
        raw = (await resp.read()).decode()
    events = []
    for block in filter(None, raw.split("\n\n")):
        lines = block.split("\n")
        kind = next((ln[7:] for ln in lines if ln.startswith("event: ")), "message")
        data = "\n".join(ln[6:] for ln in lines if ln.startswith("data: "))
        events.append((kind, data))
    return resp.status, events


async def test_a_mullama_style_upstream_is_relayed_event_per_message(start_gateway, client):
    async with WsUpstream(behaviour="/mullama") as up:
        gw = await start_gateway(config_yaml(up.url, route=MULLAMA, top=SLOTS))
        body = {"prompt": "hi", "stream": True}
        status, events = await sse_events(client, gw, body)
        code, _ = await asyncio.wait_for(up.closed.get(), 2)
    assert status == 200
    assert [json.loads(data) for _, data in events] == [
        {"type": "token", "text": "a"},
        {"type": "token", "text": "b\nc"},  # a line break survives as two data lines
        {"type": "done"},
    ]  # and no [DONE]: done_event is false
    assert json.loads(up.received[0]) == body  # the request body, as the first message
    assert code == 1000  # the gateway closed the finished session cleanly
    await gauges_return_to_zero(client, gw, "slots")


@pytest.mark.parametrize(
    ("behaviour", "says"),
    [
        ("/mullama-cut", "lost the WebSocket"),
        ("/mullama-1011", "closed the WebSocket with 1011 backend crashed"),
        ("/mullama-stall", "upstream silent"),
    ],
    ids=["connection-dropped", "closed-1011", "stalled"],
)
async def test_anything_but_the_end_message_ends_with_an_error_event(
    start_gateway, client, behaviour, says
):
    async with WsUpstream(behaviour=behaviour) as up:
        gw = await start_gateway(config_yaml(up.url, route=MULLAMA, top=SLOTS))
        status, events = await sse_events(client, gw, {"prompt": "hi"})
    assert status == 200
    assert events[0] == ("message", '{"type": "token", "text": "a"}')
    (last_kind, last_data) = events[-1]
    assert last_kind == "error"
    assert says in json.loads(last_data)["error"]["message"]
    assert all(data != "[DONE]" for _, data in events)
    await gauges_return_to_zero(client, gw, "slots")


@pytest.mark.parametrize(
    "flags",
    [["--fail-status", "503"], ["--reset-after", "0"], ["--stall-after", "0"]],
    ids=["503-at-the-upgrade", "reset-before-content", "silent-before-content"],
)
async def test_a_failure_before_the_first_content_falls_back(start_gateway, client, flags):
    route = INFERNEO + "fallbacks: [good]\nretry: {attempts: 1}\ntimeouts: {first_chunk: 500ms}\n"
    async with FakeLLM(*flags) as bad, FakeLLM("--tokens", "4") as good:
        gw = await start_gateway(
            config_yaml(bad.url, route=route, top=SLOTS, extra_upstreams=http_upstream("good", good.url))
        )
        bridged = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x")
        text, finishes = await collect(bridged)
        await bridged.close()
    assert text and finishes[-1] == "stop"
    await gauges_return_to_zero(client, gw, "slots")
