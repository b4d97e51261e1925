"""HTTP requests served by a gRPC method (a route's `grpc_bridge`), with descriptors from the
upstream's server reflection: the scripted gRPC upstream (grpcio, reflection on) behind the
gateway, plain HTTP in front (aiohttp as the client, reading SSE as curl -N would)."""

from __future__ import annotations

import json

import pytest

from tests.support.grpc_calls import grpc_config
from tests.support.grpc_procs import ScriptedGrpc
from tests.support.grpc_upstream import STREAM
from tests.test_admission import gauges_return_to_zero

SLOTS = "limits: {concurrency: {slots: {capacity: 10, weights: {stream: 3, unary: 1}}}}\n"


@pytest.fixture
async def grpc_up():
    async with ScriptedGrpc() as up:
        yield up


def bridge(urls, route: str = "", **kw) -> str:
    """The gRPC route `r` of grpc_config, and an HTTP route `b` bridged to Tokens/Stream."""
    return grpc_config(urls, top=SLOTS, **kw) + (
        f"  - name: b\n    upstream: g\n    match: {{path: /v1/tokens}}\n"
        f"    grpc_bridge: {{method: {STREAM}}}\n    limits: [slots]\n"
        + "".join(f"    {line}\n" for line in route.splitlines())
    )


def events_of(text: str) -> list[tuple[str, str]]:
    """(event name, data) of each SSE event."""
    out = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        if not lines:
            continue
        name = next((line[7:] for line in lines if line.startswith("event: ")), "message")
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        out.append((name, data))
    return out


async def test_each_message_is_one_json_event_then_done(start_gateway, grpc_up, client):
    gw = await start_gateway(bridge(grpc_up.url))
    async with client.post(gw.url + "/v1/tokens", json={"prompt": "hi", "n": 3}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        events = events_of(await resp.text())
    assert events == [
        ("message", json.dumps({"text": f"hi-{i}", "index": i}, separators=(",", ":")))
        for i in range(3)
    ] + [("message", "[DONE]")]
    await gauges_return_to_zero(client, gw, "slots")


@pytest.mark.parametrize(
    "status_name, http_status, retry",
    [
        ("INVALID_ARGUMENT", 400, "retry: {on: [UNAVAILABLE]}"),
        ("RESOURCE_EXHAUSTED", 429, "retry: {attempts: 1}"),
        ("UNAVAILABLE", 503, "retry: {attempts: 2, on: [UNAVAILABLE], backoff: {base: 10ms}}"),
        ("NOT_FOUND", 404, ""),
    ],
)
async def test_a_status_before_the_first_message_is_its_http_status(
    start_gateway, grpc_up, client, status_name, http_status, retry
):
    gw = await start_gateway(bridge(grpc_up.url, route=retry))
    body = {"prompt": "x", "n": 2, "fail": status_name, "tag": "s"}
    async with client.post(gw.url + "/v1/tokens", json=body) as resp:
        error = (await resp.json())["error"]
        assert resp.status == http_status, error
    assert (error["code"], error["message"]) == (status_name, f"scripted {status_name}")
    tries = 2 if status_name == "UNAVAILABLE" else 1
    assert len(await grpc_up.lines_with("call s", count=tries)) == tries
    await gauges_return_to_zero(client, gw, "slots")


async def test_a_status_after_the_first_message_is_an_error_event(start_gateway, grpc_up, client):
    gw = await start_gateway(bridge(grpc_up.url))
    body = {"prompt": "e", "n": 5, "fail": "INTERNAL", "fail_after": 2}
    async with client.post(gw.url + "/v1/tokens", json=body) as resp:
        assert resp.status == 200
        events = events_of(await resp.text())
    assert [name for name, _ in events] == ["message", "message", "error"]
    error = json.loads(events[-1][1])["error"]
    assert "upstream ended the call with INTERNAL: scripted INTERNAL" in error["message"]
    assert "[DONE]" not in [data for _, data in events]  # never a clean end after a failure
    await gauges_return_to_zero(client, gw, "slots")


async def test_a_stall_is_ended_by_chunk_gap_with_an_error_event(start_gateway, grpc_up, client):
    gw = await start_gateway(bridge(grpc_up.url, route="timeouts: {chunk_gap: 300ms}"))
    body = {"prompt": "g", "n": 5, "stall_after": 1, "tag": "g"}
    async with client.post(gw.url + "/v1/tokens", json=body) as resp:
        events = events_of(await resp.text())
    assert [name for name, _ in events] == ["message", "error"]
    assert json.loads(events[-1][1])["error"]["type"] == "upstream_timeout"
    await grpc_up.lines_with("cancelled g")
    await gauges_return_to_zero(client, gw, "slots")


async def test_a_client_gone_cancels_the_upstream_call(start_gateway, grpc_up, client):
    gw = await start_gateway(bridge(grpc_up.url))
    body = {"prompt": "k", "n": 500, "gap_ms": 20, "tag": "k"}
    async with client.post(gw.url + "/v1/tokens", json=body) as resp:
        await resp.content.readuntil(b"\n\n")
        resp.connection.transport.abort()  # the client leaves mid-stream
    await grpc_up.lines_with("cancelled k", timeout=2)
    await gauges_return_to_zero(client, gw, "slots")


async def test_ndjson_output_and_a_bad_body(start_gateway, grpc_up, client):
    text = bridge(grpc_up.url).replace(f"method: {STREAM}}}", f"method: {STREAM}, output: ndjson}}")
    gw = await start_gateway(text)
    async with client.post(gw.url + "/v1/tokens", json={"prompt": "n", "n": 2}) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = (await resp.text()).splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["n-0", "n-1"]
    async with client.post(gw.url + "/v1/tokens", data=b"{not json") as resp:
        assert resp.status == 400
        assert "streamtest.TokensRequest" in (await resp.json())["error"]["message"]
