"""The lean upstream client (plain http://): its own keep-alive pool and its HTTP/1.1 parsing,
over real sockets. What it must keep from the aiohttp client it replaced: a connection is
reused only after a complete response; one cut mid-body is closed, never reused; requests in
flight per upstream stay within `max_connections`; anything that breaks an exchange ends it
visibly; a kept-alive connection the upstream closed while idle costs the client nothing."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass

import aiohttp
import pytest

from tests.conftest import chat_body, config_yaml
from tests.support.scripted_upstream import (
    Raw,
    RawResponse,
    Respond,
    Stall,
    WaitFor,
    content,
    done,
    role_delta,
    sse_tokens,
)

OK_STREAM = Respond(sse=True, chunks=sse_tokens(["ok "]))
ONE_TRY = "retry: {attempts: 1}\n"


async def _chat(client, gw, stream=True) -> tuple[int, bytes]:
    async with client.post(gw.url + "/v1/chat/completions", json=chat_body(stream)) as resp:
        return resp.status, await resp.read()


def _sample(gw, name: str, **labels: str) -> float:
    return gw.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


@dataclass
class RespondThenClose(Respond):
    """A whole keep-alive response, then a clean close: the upstream's idle timeout firing."""

    async def play(self, conn) -> bool:
        await super().play(conn)
        return False


# ------------------------------------------------------------------ keep-alive and reuse


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(OK_STREAM, id="chunked-stream"),
        pytest.param(Respond(json={"ok": True}), id="content-length"),
        pytest.param(Respond(status=404, json={"error": {"message": "no"}}), id="error-status"),
    ],
)
async def test_a_connection_is_reused_after_a_complete_response(
    start_gateway, upstream, client, first
):
    upstream.script(first, OK_STREAM)
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    await _chat(client, gw)
    assert (await _chat(client, gw))[0] == 200
    first_request, second_request = upstream.requests
    assert upstream.connections_accepted == 1
    assert first_request.connection_id == second_request.connection_id


async def test_a_stream_cut_by_its_client_closes_its_connection_and_the_next_gets_a_new_one(
    start_gateway, upstream, client
):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]), OK_STREAM)
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
        await resp.content.readuntil(b"a ")
    (closed,) = await upstream.wait_for_closed_events(1)
    assert closed.mid_response  # the backend stops generating for nobody
    status, body = await _chat(client, gw)
    assert status == 200 and b"ok " in body
    assert upstream.connections_accepted == 2


async def test_a_body_delimited_by_the_close_is_relayed_whole_and_its_connection_not_kept(
    start_gateway, upstream, client
):
    upstream.script(Respond(headers={"Content-Type": "text/plain"}, chunks=[b"all ", b"of it"],
                            chunked=False), OK_STREAM)
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    assert await _chat(client, gw, stream=False) == (200, b"all of it")
    assert (await _chat(client, gw))[0] == 200
    assert upstream.connections_accepted == 2


async def test_a_kept_alive_connection_the_upstream_closed_while_idle_costs_nothing(
    start_gateway, upstream, client
):
    upstream.script(RespondThenClose(sse=True, chunks=sse_tokens(["ok "])))
    upstream.default = OK_STREAM
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    assert (await _chat(client, gw))[0] == 200
    await upstream.wait_connections_closed()
    status, body = await _chat(client, gw)
    assert status == 200 and b"ok " in body
    assert upstream.connections_accepted == 2
    assert _sample(gw, "streamgate_endpoint_ejections_total", upstream="up") == 0


async def test_requests_in_flight_stay_within_max_connections(start_gateway, upstream, client):
    release = asyncio.Event()
    held = Respond(sse=True, chunks=[role_delta(), content("a "), WaitFor(release), done()])
    upstream.script(held, held)
    upstream.default = OK_STREAM
    cfg = config_yaml(upstream.url, upstream="max_connections: 2\n", route=ONE_TRY)
    gw = await start_gateway(cfg)
    streams = [asyncio.ensure_future(_chat(client, gw)) for _ in range(3)]
    await upstream.wait_for_requests(2)
    await asyncio.sleep(0.05)  # the third is waiting for a slot, not on a third connection
    assert (len(upstream.requests), upstream.connections_accepted) == (2, 2)
    release.set()
    assert [status for status, _ in await asyncio.gather(*streams)] == [200, 200, 200]
    assert upstream.connections_accepted == 2  # the third reused a freed connection


# ------------------------------------------------------------------ what ends an exchange


@pytest.mark.parametrize(
    "framing, broken",
    [
        pytest.param("raw", b"zz-not-hex\r\nboom\r\n", id="raw-bad-chunk-size"),
        pytest.param("ndjson", b"5\r\n{}\n", id="ndjson-chunk-cut-by-close"),
    ],
)
async def test_a_body_broken_mid_stream_reaches_the_client_incomplete(
    start_gateway, upstream, client, framing, broken
):
    upstream.script(
        Respond(
            headers={"Content-Type": "application/x-ndjson", "Transfer-Encoding": "chunked"},
            chunked=False,
            chunks=[Raw(b"3\r\n{}\n\r\n"), Raw(broken), Stall()],
        )
    )
    upstream.default = OK_STREAM
    route = f"framing: {framing}\ntimeouts: {{chunk_gap: 5s}}\n" + ONE_TRY
    gw = await start_gateway(config_yaml(upstream.url, route=route))
    with pytest.raises(aiohttp.ClientPayloadError):
        async with client.post(gw.url + "/v1/x", json={"stream": True}) as resp:
            assert resp.status == 200
            await resp.read()
    assert (await _chat(client, gw))[0] == 200
    assert upstream.connections_accepted == 2  # the broken one was not reused


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(RawResponse(b"NOT HTTP AT ALL\r\n\r\n"), id="garbage-status-line"),
        pytest.param(RawResponse(b"HTTP/1.1 200 OK\r\nContent-Le"), id="cut-in-headers"),
    ],
)
async def test_a_malformed_answer_before_the_body_is_a_reset(
    start_gateway, upstream, client, answer
):
    upstream.script(answer)
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    status, body = await _chat(client, gw)
    assert status == 502 and json.loads(body)["error"]["type"] == "upstream_reset"


async def test_an_interim_answer_is_skipped_for_the_real_one(start_gateway, upstream, client):
    upstream.script(
        RawResponse(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n"
            b'{"ok": true}'
        )
    )
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    assert await _chat(client, gw, stream=False) == (200, b'{"ok": true}')


async def test_bytes_after_a_complete_answer_keep_its_connection_out_of_the_pool(
    start_gateway, upstream, client
):
    upstream.script(
        RawResponse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE", Stall())
    )
    upstream.default = OK_STREAM
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    assert await _chat(client, gw, stream=False) == (200, b"ok")
    assert (await _chat(client, gw))[0] == 200
    assert upstream.connections_accepted == 2


async def test_a_head_request_gets_the_headers_and_no_body(start_gateway, upstream, client):
    upstream.script(Respond(headers={"Content-Type": "text/plain"}, content_length=5))
    upstream.default = OK_STREAM
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    async with client.head(gw.url + "/file") as resp:
        assert resp.status == 200 and await resp.read() == b""
    assert upstream.requests[0].method == "HEAD"
    assert (await _chat(client, gw))[0] == 200


# ------------------------------------------------------------------ connecting


async def test_a_connect_that_hangs_past_timeouts_connect_is_a_502_connect_error(
    start_gateway, client
):
    with socket.socket() as listener, socket.socket() as filler:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # one pending connection fills it: the next SYN gets no answer
        filler.connect(listener.getsockname())
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        route = "timeouts: {connect: 100ms, first_chunk: 5s}\n" + ONE_TRY
        gw = await start_gateway(config_yaml(url, route=route))
        status, body = await _chat(client, gw)
    assert status == 502, body
    assert json.loads(body)["error"]["type"] == "upstream_unavailable"
    assert _sample(gw, "streamgate_upstream_attempts_total", upstream="up",
                   outcome="connect_error") == 1
