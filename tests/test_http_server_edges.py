"""The proxy listener's HTTP/1.1 server (connection.py) at its edges, over raw sockets: what a
malicious, buggy or merely old client can send, and what it must get.

Every scenario also checks what must be left behind: no request in flight, the concurrency
unit back, the upstream connection closed when the client went away.
"""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest
import websockets

from gateway.protocols.http.connection import HOLD
from tests.conftest import config_yaml
from tests.support.raw_http import closed_within, connect, exchange, read_answer, request
from tests.support.scripted_upstream import Respond, Stall, WaitFor

BOUND = 5.0
SHORT = 0.3
SLOTS = "limits: {concurrency: {slots: {capacity: 1}}}\n"
SSE_HEAD = {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"}
SIZED_HEAD = {"Content-Type": "application/json", "Content-Length": "8"}
"""What a HEAD is answered with: the GET's framing headers, and no body."""
LIMITED = "limits: [slots]\ntimeouts: {queue: 10ms}\n"


@pytest.fixture
async def gateway(start_gateway, upstream):
    upstream.default = Respond(body=b'{"ok": true}')
    return await start_gateway(
        config_yaml(upstream.url, server="drain_delay: 0s", top=SLOTS, route=LIMITED)
    )


async def until(predicate, what: str, timeout: float = BOUND) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
    assert predicate(), what


async def settled(gw) -> None:
    """No request in flight, no connection left in the listener, and the one unit is free
    (a new request is admitted at once: capacity 1, no queueing)."""
    proxy = gw.gateway.proxy
    await until(lambda: not proxy.in_flight, "a request stayed in flight")
    answer = await exchange(gw.url, request("POST", "/v1/x", b"{}"))
    assert answer.status == 200, answer.body


def listener(gw):
    return gw.gateway._listener


# ------------------------------------------------------------------ framing


async def test_chunked_trailers_do_not_become_the_next_requests_headers(gateway, upstream):
    reader, writer = await connect(gateway.url)
    try:
        writer.write(
            b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\nX-Trailer: smuggled\r\nAuthorization: Bearer other\r\n\r\n"
            + request("POST", "/v1/y", b"{}")
        )
        first, second = await read_answer(reader, BOUND), await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert (first.status, second.status) == (200, 200)
    sent = await upstream.wait_for_requests(2)
    assert sent[0].body == b"{}"
    for each in sent:
        assert "x-trailer" not in each.headers and "authorization" not in each.headers


async def test_an_http10_keep_alive_client_is_told_and_served_again(gateway, upstream):
    reader, writer = await connect(gateway.url)
    ask = b"POST /v1/x HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}"
    try:
        writer.write(ask)
        first = await read_answer(reader, BOUND)
        writer.write(ask)
        second = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert (first.status, second.status) == (200, 200)
    # An HTTP/1.0 client assumes a close unless told otherwise (as aiohttp told it).
    assert first.headers["Connection"].lower() == "keep-alive"


async def test_an_http10_request_without_keep_alive_is_answered_then_closed(gateway):
    reader, writer = await connect(gateway.url)
    try:
        writer.write(b"POST /v1/x HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert answer.status == 200 and answer.closed


async def test_connection_close_from_the_client_answers_then_closes_and_reads_no_more(
    gateway, upstream
):
    reader, writer = await connect(gateway.url)
    try:  # what follows the close is neither served nor refused
        writer.write(
            request("POST", "/v1/x", b"{}", "Connection: close\r\n") + request("POST", "/v1/y")
        )
        answer = await read_answer(reader, BOUND)
        assert await closed_within(reader, BOUND) == b""
    finally:
        writer.close()
    assert answer.status == 200 and answer.headers["Connection"] == "close"
    assert [r.path for r in upstream.requests] == ["/v1/x"]
    registry = gateway.gateway.metrics.registry
    assert registry.get_sample_value("streamgate_bad_requests_total", {"reason": "bad_request_line"}) is None


@pytest.mark.parametrize(
    "method, answer",
    [
        pytest.param("HEAD", Respond(headers=SSE_HEAD, chunked=False), id="HEAD-of-a-stream"),
        pytest.param("HEAD", Respond(headers=SIZED_HEAD, chunked=False), id="HEAD-of-a-body"),
        pytest.param("POST", Respond(status=204, chunked=False, content_length=0), id="204"),
        pytest.param("POST", Respond(status=204, chunked=False), id="204-unframed"),
        pytest.param("GET", Respond(status=304, chunked=False), id="304-unframed"),
    ],
)
async def test_bodiless_answers_keep_the_connection_in_step(gateway, upstream, method, answer):
    upstream.script(answer)
    upstream.default = Respond(body=b'{"next": true}')
    reader, writer = await connect(gateway.url)
    try:
        writer.write(request(method, "/v1/x") + request("POST", "/v1/y", b"{}"))
        async with asyncio.timeout(BOUND):
            head = await reader.readuntil(b"\r\n\r\n")
        if method == "HEAD":  # Content-Length tells the GET's size: nothing follows here
            assert b"transfer-encoding" not in head.lower()
        else:
            assert b"content-length" not in head.lower()
            assert b"transfer-encoding" not in head.lower()
        following = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert following.status == 200 and following.json() == {"next": True}


async def test_a_head_request_is_sent_upstream_once_and_told_the_gets_length(gateway, upstream):
    upstream.default = Respond(headers=SIZED_HEAD, chunked=False)
    reader, writer = await connect(gateway.url)
    try:
        writer.write(request("HEAD", "/v1/x"))
        async with asyncio.timeout(BOUND):
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nContent-Length: 8\r\n" in head
    assert [r.method for r in upstream.requests] == ["HEAD"]  # an empty 200 is no failure here


async def test_requests_pipelined_behind_a_stream_are_answered_after_it(gateway, upstream):
    chunks = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    upstream.script(Respond(sse=True, chunks=chunks), Respond(body=b'{"n": 2}'))
    reader, writer = await connect(gateway.url)
    try:
        writer.write(request("POST", "/v1/s", b"{}") + request("POST", "/v1/x", b"{}"))
        async with asyncio.timeout(BOUND):
            head = await reader.readuntil(b"\r\n\r\n")
            body = b""
            while not body.endswith(b"0\r\n\r\n"):
                body += await reader.read(65536)
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert b"Transfer-Encoding: chunked" in head
    assert b"data: [DONE]" in body and body.count(b"0\r\n\r\n") == 1
    assert answer.json() == {"n": 2}


async def test_expect_100_continue_then_no_body_gets_408_and_frees_its_unit(
    start_gateway, upstream
):
    upstream.default = Respond(body=b'{"ok": true}')
    gw = await start_gateway(
        config_yaml(upstream.url, server=f"body_timeout: {SHORT}s", top=SLOTS, route=LIMITED)
    )
    reader, writer = await connect(gw.url)
    try:
        writer.write(
            b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        async with asyncio.timeout(BOUND):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert answer.status == 408 and answer.closed
    assert upstream.requests == []
    await settled(gw)


# ------------------------------------------------------------------ headers


async def test_a_head_sent_byte_by_byte_within_header_timeout_is_served(start_gateway, upstream):
    upstream.default = Respond(body=b'{"ok": true}')
    gw = await start_gateway(config_yaml(upstream.url, server="header_timeout: 5s"))
    data = request("POST", "/v1/x", b"{}", "X-A: " + "a" * 200 + "\r\n")
    reader, writer = await connect(gw.url)
    writer.transport.get_extra_info("socket").setsockopt(
        socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
    )
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0)
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert answer.status == 200
    (sent,) = upstream.requests
    assert sent.headers["X-A"] == "a" * 200


@pytest.mark.parametrize("size, status", [(8190, 200), (8191, 400)])
async def test_a_header_value_at_8190_bytes_is_served_and_one_more_refused(
    gateway, upstream, size, status
):
    answer = await exchange(gateway.url, request("POST", "/v1/x", b"{}", f"X-A: {'a' * size}\r\n"))
    assert answer.status == status


@pytest.mark.parametrize("count, status", [(126, 200), (129, 400)])
async def test_many_tiny_headers_are_capped_at_128(gateway, count, status):
    lines = "".join(f"X{i}:\r\n" for i in range(count))
    answer = await exchange(gateway.url, request("POST", "/v1/x", b"{}", lines))
    assert answer.status == status


@pytest.mark.parametrize(
    "probe",
    [
        pytest.param(b"X-A: one\r\n two\r\n", id="obs-fold"),
        pytest.param(b": empty-name\r\n", id="empty-name"),
        pytest.param(b"X-A: a\x00b\r\n", id="nul"),
    ],
)
async def test_header_oddities_are_refused_with_a_400(gateway, upstream, probe):
    answer = await exchange(
        gateway.url, b"POST /v1/x HTTP/1.1\r\nHost: gw\r\n" + probe + b"Content-Length: 0\r\n\r\n"
    )
    assert answer.status == 400 and answer.closed
    assert upstream.requests == []


# ------------------------------------------------------------------ timeouts


async def test_blank_lines_do_not_keep_an_idle_connection_open(start_gateway, upstream):
    gw = await start_gateway(
        config_yaml(upstream.url, server=f"idle_timeout: {SHORT}s, header_timeout: 30s")
    )
    reader, writer = await connect(gw.url)

    async def trickle():
        while not writer.is_closing():
            writer.write(b"\r\n")
            await asyncio.sleep(SHORT / 4)

    trickler = asyncio.create_task(trickle())
    try:
        assert await closed_within(reader, BOUND) == b""
    finally:
        trickler.cancel()
        writer.close()


# ------------------------------------------------------------------ disconnects


async def test_a_client_gone_behind_a_pipelined_request_cancels_its_stream_at_once(
    gateway, upstream
):
    upstream.script(Respond(sse=True, chunks=[b"data: one\n\n", Stall()]))
    reader, writer = await connect(gateway.url)
    writer.write(request("POST", "/v1/s", b"{}") + request("POST", "/v1/x", b"{}"))
    async with asyncio.timeout(BOUND):
        await reader.readuntil(b"data: one\n\n\r\n")
    writer.close()
    (closed,) = await upstream.wait_for_closed_events(1, timeout=BOUND)
    assert closed.mid_response
    assert len(upstream.requests) == 1
    await settled(gateway)


async def test_a_client_gone_mid_stream_cancels_the_upstream_at_once(gateway, upstream):
    upstream.script(Respond(sse=True, chunks=[b"data: one\n\n", Stall()]))
    reader, writer = await connect(gateway.url)
    writer.write(request("POST", "/v1/s", b"{}"))
    async with asyncio.timeout(BOUND):
        await reader.readuntil(b"data: one\n\n\r\n")
    writer.close()
    (closed,) = await upstream.wait_for_closed_events(1, timeout=BOUND)
    assert closed.mid_response
    await settled(gateway)


async def test_a_half_close_after_a_whole_request_is_a_disconnect(gateway, upstream):
    """A client that shuts its sending side down cannot be told from one that left (both are
    an EOF); as with aiohttp before, and nginx, the request ends as a disconnect."""
    release = asyncio.Event()
    upstream.script(Respond(sse=True, chunks=[WaitFor(release), b"data: one\n\n"]))
    reader, writer = await connect(gateway.url)
    try:
        writer.write(request("POST", "/v1/s", b"{}"))
        await upstream.wait_for_requests(1, timeout=BOUND)
        writer.write_eof()
        (closed,) = await upstream.wait_for_closed_events(1, timeout=BOUND)
        assert closed.mid_response
        assert await closed_within(reader, BOUND) == b""
    finally:
        release.set()
        writer.close()
    await settled(gateway)


# ------------------------------------------------------------------ memory


async def test_a_body_in_one_byte_chunks_is_held_compactly(start_gateway, upstream):
    """Each chunk is its own bytes object out of llhttp: 1 MiB of 1-byte chunks must not
    cost ~40 MiB of small objects."""
    gw = await start_gateway(config_yaml(upstream.url, server="max_request_body: 1MiB"))
    size = 256 * 1024
    reader, writer = await connect(gw.url)
    try:
        writer.write(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"1\r\na\r\n" * size)  # no last chunk: the body stays held
        (conn,) = listener(gw).connections
        await until(lambda: conn.current is not None and conn.current.size == size, "body")
        parts = conn.current.parts
        held = sys.getsizeof(parts) + sum(sys.getsizeof(p) for p in parts)
    finally:
        writer.close()
    assert held < 2 * size


# ------------------------------------------------------------------ upgrades


async def test_a_websocket_upgrade_pipelined_behind_a_plain_request(start_gateway, upstream):
    from tests.test_websocket import WsUpstream  # an aiohttp WebSocket echo server

    async with WsUpstream() as ws_up:
        gw = await start_gateway(config_yaml(ws_up.url, route="websocket: {idle: 5s}\n"))
        reader, writer = await connect(gw.url)
        try:
            writer.write(
                request("GET", "/plain")
                + b"GET /echo HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            first = await read_answer(reader, BOUND)
            async with asyncio.timeout(BOUND):
                switching = await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.close()
    assert first.status != 101
    assert switching.startswith(b"HTTP/1.1 101 ")


# ------------------------------------------------------------------ drain


async def test_a_drain_ends_connections_in_every_state(start_gateway, upstream):
    gateway = await start_gateway(config_yaml(upstream.url, server="drain_delay: 0s"))
    upstream.default = Respond(body=b'{"ok": true}')
    release = asyncio.Event()
    upstream.script(
        Respond(sse=True, chunks=[b"data: one\n\n", WaitFor(release), b"data: [DONE]\n\n"])
    )
    never_used = await connect(gateway.url)
    kept_alive = await connect(gateway.url)
    mid_head = await connect(gateway.url)
    mid_body = await connect(gateway.url)
    streaming = await connect(gateway.url)
    everyone = [never_used, kept_alive, mid_head, mid_body, streaming]
    try:
        streaming[1].write(request("POST", "/v1/s", b"{}") + request("POST", "/v1/queued"))
        async with asyncio.timeout(BOUND):
            await streaming[0].readuntil(b"data: one\n\n\r\n")
        kept_alive[1].write(request("POST", "/v1/x", b"{}"))
        assert (await read_answer(kept_alive[0], BOUND)).status == 200
        mid_head[1].write(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\n")
        mid_body[1].write(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\n{")
        await until(lambda: len(listener(gateway).connections) == 5, "connections")
        draining = asyncio.create_task(gateway.gateway.drain_and_stop())
        for reader, _ in (never_used, kept_alive):
            assert await closed_within(reader, BOUND) == b""
        release.set()
        async with asyncio.timeout(BOUND):
            rest = await streaming[0].read(-1)
        assert b"data: [DONE]" in rest and b"0\r\n\r\n" in rest
        await asyncio.wait_for(draining, 3 * BOUND)
        for reader, _ in (mid_head, mid_body):
            await closed_within(reader, BOUND)
    finally:
        release.set()
        for _, writer in everyone:
            writer.close()
    assert listener(gateway).connections == set()
    assert not gateway.gateway.proxy.in_flight
    assert [r.path for r in upstream.requests] == ["/v1/s", "/v1/x"]  # not the queued one


async def test_websockets_client_still_connects(start_gateway):
    from tests.test_websocket import WsUpstream

    async with WsUpstream() as ws_up:
        gw = await start_gateway(config_yaml(ws_up.url, route="websocket: {idle: 5s}\n"))
        url = gw.url.replace("http://", "ws://") + "/echo"
        async with websockets.connect(url) as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), BOUND) == "hi"


async def test_pipelined_bytes_behind_a_stream_are_held_within_a_bound(start_gateway, upstream):
    gw = await start_gateway(config_yaml(upstream.url))
    release = asyncio.Event()
    upstream.script(Respond(sse=True, chunks=[b"data: one\n\n", WaitFor(release)]))
    upstream.default = Respond(body=b'{"ok": true}')
    n, pad = 200, "X-Pad: " + "p" * 1000 + "\r\n"  # 200 KiB: more than is held unread
    reader, writer = await connect(gw.url)
    try:
        writer.write(request("POST", "/v1/s", b"{}"))
        async with asyncio.timeout(BOUND):
            await reader.readuntil(b"data: one\n\n\r\n")
        writer.write(b"".join(request("POST", f"/v1/{i}", b"{}", pad) for i in range(n)))
        (conn,) = listener(gw).connections
        await until(lambda: conn._paused, "reading paused once enough is held")
        assert conn._held_size < HOLD + 512 * 1024  # at most one read more
        release.set()
        async with asyncio.timeout(BOUND):
            await reader.readuntil(b"0\r\n\r\n")
        answers = [await read_answer(reader, BOUND) for _ in range(n)]
    finally:
        release.set()
        writer.close()
    assert [a.status for a in answers] == [200] * n
    assert [r.path for r in upstream.requests[1:]] == [f"/v1/{i}" for i in range(n)]


@pytest.mark.parametrize(
    "probe, reason",
    [
        pytest.param(b"GET /v1/x HTTP/2.0\r\nHost: gw\r\n\r\n", "bad_request_line", id="HTTP/2.0"),
        pytest.param(b"GET /v1/x HTTP/0.9\r\nHost: gw\r\n\r\n", "bad_request_line", id="HTTP/0.9"),
        pytest.param(
            b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Length: +1\r\n\r\n{",
            "bad_message",
            id="signed-content-length",
        ),
    ],
)
async def test_other_versions_and_bad_lengths_are_refused_under_their_reason(
    gateway, upstream, probe, reason
):
    answer = await exchange(gateway.url, probe)
    assert answer.status == 400 and answer.closed
    registry = gateway.gateway.metrics.registry
    assert registry.get_sample_value("streamgate_bad_requests_total", {"reason": reason}) == 1
    assert upstream.requests == []


async def test_a_request_refused_while_draining_closes_its_connection(start_gateway, upstream):
    gateway = await start_gateway(config_yaml(upstream.url, server="drain_delay: 10s"))
    upstream.default = Respond(body=b'{"ok": true}')
    reader, writer = await connect(gateway.url)
    try:
        writer.write(request("POST", "/v1/x", b"{}"))
        assert (await read_answer(reader, BOUND)).status == 200
        draining = asyncio.create_task(gateway.gateway.drain_and_stop())
        async with asyncio.timeout(BOUND):  # the listener stays open for drain_delay
            while not gateway.gateway.proxy.draining:
                await asyncio.sleep(0.005)
        writer.write(request("POST", "/v1/x", b"{}"))
        refused = await read_answer(reader, BOUND)
    finally:
        writer.close()
        draining.cancel()
    # Closed at once, so that the client's next request goes to a replica that serves.
    assert refused.status == 503 and refused.closed
