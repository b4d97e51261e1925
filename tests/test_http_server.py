"""The proxy listener's own HTTP/1.1 (connection.py): what a client of any age or manners gets.

Raw sockets, because these are the things client libraries do not let a test choose: several
requests in one write, an interim 100, HTTP/1.0, an upgrade to something that is not WebSocket.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import config_yaml
from tests.support.raw_http import closed_within, connect, exchange, read_answer, request
from tests.support.scripted_upstream import Respond

BOUND = 5.0


@pytest.fixture
async def gateway(start_gateway, upstream):
    upstream.default = Respond(body=b'{"ok": true}')
    return await start_gateway(config_yaml(upstream.url, server="drain_delay: 0s"))


def bad_requests(gw, reason: str) -> float:
    registry = gw.gateway.metrics.registry
    return registry.get_sample_value("streamgate_bad_requests_total", {"reason": reason}) or 0.0


async def test_pipelined_requests_are_answered_in_order_on_one_connection(gateway, upstream):
    n = 40  # more than fit in the queue at once: reading pauses and resumes
    reader, writer = await connect(gateway.url)
    try:
        writer.write(b"".join(request("POST", "/v1/x", b'{"n": %d}' % i) for i in range(n)))
        answers = [await read_answer(reader, BOUND) for _ in range(n)]
    finally:
        writer.close()
    assert [a.status for a in answers] == [200] * n
    assert not any(a.closed for a in answers)
    assert [r.json()["n"] for r in upstream.requests] == list(range(n))


async def test_expect_100_continue_is_answered_before_the_body_is_sent(gateway, upstream):
    body = b'{"big": "' + b"x" * 2000 + b'"}'
    reader, writer = await connect(gateway.url)
    try:
        head = request("POST", "/v1/x", body, "Expect: 100-continue\r\n")[: -len(body)]
        writer.write(head)
        async with asyncio.timeout(BOUND):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert answer.status == 200
    (sent,) = upstream.requests
    assert sent.body == body and "expect" not in sent.headers


async def test_an_http10_client_reads_a_stream_to_the_close(gateway, upstream):
    chunks = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
    upstream.default = Respond(sse=True, chunks=chunks)
    reader, writer = await connect(gateway.url)
    try:
        writer.write(b"POST /v1/x HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
        whole = await closed_within(reader, BOUND)
    finally:
        writer.close()
    head, _, body = whole.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower() and b"Connection: close" in head
    assert body == b"".join(chunks)


async def test_a_head_growing_past_twice_max_header_bytes_is_refused_before_it_ends(
    start_gateway, upstream
):
    gw = await start_gateway(config_yaml(upstream.url, server="max_header_bytes: 2KiB"))
    reader, writer = await connect(gw.url)
    try:  # the head never ends: without a bound, it would be held until header_timeout
        writer.write(b"GET /v1/x HTTP/1.1\r\n" + b"X-Big: " + b"v" * 1000 + b"\r\n")
        for _ in range(5):
            writer.write(b"X-More: " + b"v" * 1000 + b"\r\n")
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert answer.status == 431 and answer.closed
    assert bad_requests(gw, "headers_too_large") == 1
    assert upstream.requests == []


async def test_an_upgrade_to_another_protocol_is_ignored_and_the_connection_kept(
    gateway, upstream
):
    reader, writer = await connect(gateway.url)
    try:
        writer.write(
            b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        first = await read_answer(reader, BOUND)
        writer.write(request("POST", "/v1/x", b"{}"))
        second = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert (first.status, second.status) == (200, 200)
    assert "upgrade" not in upstream.requests[0].headers


async def test_a_head_request_gets_no_body(gateway, upstream):
    reader, writer = await connect(gateway.url)
    try:
        writer.write(b"HEAD /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
        async with asyncio.timeout(BOUND):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.write(request("POST", "/v1/x", b"{}"))  # the next answer follows at once
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert answer.status == 200 and json.loads(answer.body) == {"ok": True}


async def test_a_drain_closes_idle_connections_and_busy_ones_after_their_answer(
    gateway, upstream
):
    idle_reader, idle_writer = await connect(gateway.url)
    busy_reader, busy_writer = await connect(gateway.url)
    try:
        idle_writer.write(request("POST", "/v1/x", b"{}"))
        await read_answer(idle_reader, BOUND)
        upstream.default = Respond(body=b'{"ok": true}', delay=0.3)
        busy_writer.write(request("POST", "/v1/x", b"{}"))
        await upstream.wait_for_requests(2, timeout=BOUND)
        draining = asyncio.create_task(gateway.gateway.drain_and_stop())
        busy = await read_answer(busy_reader, BOUND)
        assert await closed_within(idle_reader, BOUND) == b""
        await asyncio.wait_for(draining, BOUND)
    finally:
        idle_writer.close()
        busy_writer.close()
    assert busy.status == 200 and busy.closed


async def test_a_client_gone_mid_body_is_not_sent_upstream(gateway, upstream):
    reader, writer = await connect(gateway.url)
    writer.write(b"POST /v1/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\n{")
    async with asyncio.timeout(BOUND):
        while not gateway.gateway.proxy.in_flight:
            await asyncio.sleep(0.005)
    writer.close()
    async with asyncio.timeout(BOUND):
        while gateway.gateway.proxy.in_flight:
            await asyncio.sleep(0.005)
    assert upstream.requests == []
    assert (await exchange(gateway.url, request("POST", "/v1/x", b"{}"))).status == 200
