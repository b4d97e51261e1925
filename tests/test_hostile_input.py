"""Hostile input on raw sockets (issue 12, finding 6): every probe gets the gateway's JSON error,
never aiohttp's text, a traceback or a 500, and the gateway still serves the next request."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.protocols.http.refusals import LOG_BURST, REASONS
from tests.conftest import config_yaml
from tests.support.raw_http import (
    closed_within,
    connect,
    exchange,
    read_answer,
    request,
)
from tests.support.scripted_upstream import Respond

MARK = b"zqxj"  # in every offending part: it must never come back to the client
POST = b"POST /v1/x HTTP/1.1\r\nHost: gw\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

MALFORMED = [
    pytest.param(
        POST + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "bad_message",
        id="content-length-and-transfer-encoding",
    ),
    pytest.param(
        POST + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nzqxj!",
        "bad_message",
        id="two-content-lengths",
    ),
    pytest.param(
        POST + b"Transfer-Encoding: xchunked\r\nX-M: zqxj\r\n\r\n0\r\n\r\n",
        "bad_message",
        id="obfuscated-transfer-encoding",
    ),
    pytest.param(
        POST + b"Transfer-Encoding : chunked\r\nX-M: zqxj\r\n\r\n0\r\n\r\n",
        "bad_message",
        id="transfer-encoding-space-before-colon",
    ),
    pytest.param(CHUNKED + b"zqxj\r\nab\r\n0\r\n\r\n", "bad_message", id="bad-chunk-size"),
    pytest.param(
        CHUNKED + b"fffffffffffffffffffff\r\nzqxj\r\n0\r\n\r\n",
        "bad_message",
        id="overflowing-chunk-size",
    ),
    pytest.param(b"GET /v1/zqxj HTTP/1.1\nHost: gw\n\n", "bad_request_line", id="bare-lf"),
    pytest.param(b"GET /v1/x HTTP/1.1\r\nHost: gw\rX-zqxj: 1\r\n\r\n", "bad_message", id="bare-cr"),
    pytest.param(
        b"GET /v1/x HTTP/1.1\r\nHost: gw\r\nX-A: zqxj" + b"a" * 102400 + b"\r\n\r\n",
        "line_too_long",
        id="100KiB-header-line",
    ),
    pytest.param(
        b"GET /v1/zqxj" + b"a" * 102400 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
        "line_too_long",
        id="100KiB-url",
    ),
    pytest.param(
        b"GET /v1/x HTTP/1.1\r\nHost: gw\r\n"
        + b"".join(b"X-zqxj-%d: v\r\n" % i for i in range(500))
        + b"\r\n",
        "bad_message",
        id="500-headers",
    ),
    pytest.param(
        b"GET /v1/x HTTP/1.1\r\nHost: gw\r\nX-zqxj-\xc3\xa9: 1\r\n\r\n",
        "bad_message",
        id="non-ascii-header-name",
    ),
]


@pytest.fixture
def upstream(upstream):
    """The scripted upstream, answering every request it gets with a small JSON body."""
    upstream.default = Respond(body=b'{"ok": true}', headers={"Server": "upstream/1.2.3"})
    return upstream


@pytest.fixture
async def gateway(start_gateway, upstream):
    return await start_gateway(config_yaml(upstream.url))


async def assert_still_serving(url: str) -> None:
    answer = await exchange(url, request("POST", "/v1/chat/completions", b"{}"))
    assert answer.status == 200 and answer.json() == {"ok": True}


def assert_gateway_error(answer, status: int) -> None:
    assert answer.status_line.startswith(f"HTTP/1.1 {status} ")
    assert answer.headers["Content-Type"] == "application/json"
    error = answer.json()["error"]
    assert error["request_id"] == answer.headers["x-request-id"]
    assert set(error) == {"type", "message", "request_id"}
    assert answer.headers["Server"] == "streamgate"


def bad_requests(gw, reason: str) -> float:
    registry = gw.gateway.metrics.registry
    return registry.get_sample_value("streamgate_bad_requests_total", {"reason": reason}) or 0.0


@pytest.mark.parametrize("probe, reason", MALFORMED)
async def test_malformed_requests_get_a_json_400_one_log_line_and_a_count(
    gateway, upstream, caplog, probe, reason
):
    assert reason in REASONS
    caplog.set_level(logging.DEBUG)
    answer = await exchange(gateway.url, probe)
    assert_gateway_error(answer, 400)
    assert answer.closed
    assert MARK not in answer.body and MARK.decode() not in str(answer.headers)
    assert bad_requests(gateway, reason) == 1
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert logged[0].name == "streamgate" and "\n" not in logged[0].getMessage()
    assert upstream.requests == []
    await assert_still_serving(gateway.url)


async def test_a_flood_of_bad_requests_is_counted_in_full_but_logged_sparingly(gateway, caplog):
    caplog.set_level(logging.WARNING)
    n = 60
    answers = await asyncio.gather(
        *(exchange(gateway.url, b"GET / HTTP/1.1\nHost: x\n\n") for _ in range(n))
    )
    assert {a.status for a in answers} == {400}
    assert bad_requests(gateway, "bad_request_line") == n
    logged = [r for r in caplog.records if r.name == "streamgate"]
    assert LOG_BURST <= len(logged) < LOG_BURST + 5  # a burst, then about one a second
    await assert_still_serving(gateway.url)


def _nested(prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    return prefix + b"[" * 100_000 + b"]" * 100_000 + suffix


async def test_deeply_nested_json_declared_as_json_is_a_400(gateway, upstream):
    body = _nested()
    probe = request("POST", "/v1/chat/completions", body, "Content-Type: application/json\r\n")
    answer = await exchange(gateway.url, probe)
    assert_gateway_error(answer, 400)
    assert upstream.requests == []
    await assert_still_serving(gateway.url)


async def test_deeply_nested_body_not_declared_as_json_is_relayed_as_is(gateway, upstream):
    body = _nested(b'{"a": ', b"}")
    answer = await exchange(gateway.url, request("POST", "/v1/chat/completions", body))
    assert answer.status == 200
    (sent,) = await upstream.wait_for_requests(1)
    assert sent.body == body


@pytest.mark.parametrize(
    "headers, status",
    [
        pytest.param(10, 200, id="40KB-accepted"),
        pytest.param(18, 431, id="72KB-refused"),
    ],
)
async def test_the_total_size_of_request_headers_is_bounded(gateway, upstream, headers, status):
    lines = "".join(f"X-Big-{i}: {'v' * 4000}\r\n" for i in range(headers))
    answer = await exchange(gateway.url, request("POST", "/v1/chat/completions", b"{}", lines))
    assert answer.status == status
    if status == 431:
        assert_gateway_error(answer, 431)
        assert upstream.requests == []
    await assert_still_serving(gateway.url)


async def test_max_header_bytes_is_configurable(start_gateway, upstream):
    gw = await start_gateway(config_yaml(upstream.url, server="max_header_bytes: 2KiB"))
    lines = "".join(f"X-Big-{i}: {'v' * 1000}\r\n" for i in range(3))
    answer = await exchange(gw.url, request("POST", "/v1/chat/completions", b"{}", lines))
    assert_gateway_error(answer, 431)


async def test_no_response_discloses_the_server_software(gateway, client):
    answer = await exchange(gateway.url, request("POST", "/v1/chat/completions", b"{}"))
    assert answer.headers["Server"] == "streamgate"  # the upstream's own is replaced too
    assert (await exchange(gateway.url, request("GET", "/v1/%2e%2e/x"))).headers[
        "Server"
    ] == "streamgate"
    for path in ("/healthz", "/metrics", "/no-such-page"):
        async with client.get(gateway.admin_url + path) as resp:
            assert resp.headers["Server"] == "streamgate", path


# ----------------------------------------------------------------- slow clients

TIMEOUT = 0.3
BOUND = 3.0  # generous upper bound for an event that is due after TIMEOUT


async def test_headers_trickled_slower_than_header_timeout_get_408_and_a_close(
    start_gateway, upstream
):
    server = f"header_timeout: {TIMEOUT}s, idle_timeout: 30s"
    gw = await start_gateway(config_yaml(upstream.url, server=server))
    clients = [await connect(gw.url) for _ in range(10)]
    started = time.monotonic()
    head = b"GET /v1/x HTTP/1.1\r\nHost: gw\r\nX-Slow: "

    async def trickle(writer):
        for byte in head + b"a" * 1000:
            if writer.is_closing():
                return
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)

    tricklers = [asyncio.create_task(trickle(w)) for _, w in clients]
    try:
        answers = await asyncio.gather(*(read_answer(r, BOUND) for r, _ in clients))
    finally:
        for task in tricklers:
            task.cancel()
        for _, writer in clients:
            writer.close()
    assert time.monotonic() - started < BOUND
    for answer in answers:
        assert_gateway_error(answer, 408)
        assert answer.closed
    assert bad_requests(gw, "header_timeout") == 10
    await assert_still_serving(gw.url)


@pytest.mark.parametrize("first_request", [False, True], ids=["never-used", "after-a-request"])
async def test_idle_client_connections_are_closed_after_idle_timeout(
    start_gateway, upstream, first_request
):
    server = f"idle_timeout: {TIMEOUT}s, header_timeout: 30s"
    gw = await start_gateway(config_yaml(upstream.url, server=server))
    reader, writer = await connect(gw.url)
    try:
        if first_request:
            writer.write(request("POST", "/v1/chat/completions", b"{}"))
            assert (await read_answer(reader)).status == 200
        started = time.monotonic()
        assert await closed_within(reader, BOUND) == b""
        assert time.monotonic() - started >= TIMEOUT * 0.9
    finally:
        writer.close()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"7fffffffffffffff\r\nabc", id="huge-chunk-then-a-few-bytes"),
        pytest.param(b"5\r\nab", id="short-chunk"),
    ],
)
async def test_a_body_slower_than_body_timeout_gets_408(start_gateway, upstream, body):
    gw = await start_gateway(config_yaml(upstream.url, server=f"body_timeout: {TIMEOUT}s"))
    reader, writer = await connect(gw.url)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + body
        )
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert_gateway_error(answer, 408)
    assert upstream.requests == []
    await assert_still_serving(gw.url)


async def test_a_chunk_size_broken_mid_body_is_a_400_at_once(gateway, upstream):
    reader, writer = await connect(gateway.url)
    try:
        writer.write(CHUNKED.replace(b"/v1/x", b"/v1/chat/completions") + b"2\r\nab\r\n")
        async with asyncio.timeout(BOUND):  # the proxy is reading the body when garbage comes
            while not gateway.gateway.proxy.in_flight:
                await asyncio.sleep(0.005)
        writer.write(b"zz\r\n")
        answer = await read_answer(reader, BOUND)
    finally:
        writer.close()
    assert_gateway_error(answer, 400)
    assert answer.closed
    assert upstream.requests == []
    await assert_still_serving(gateway.url)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("header_timeout", "0s", "must be greater than 0"),
        ("idle_timeout", "0s", "must be greater than 0"),
        ("body_timeout", "0s", "must be greater than 0"),
        ("max_header_bytes", "100", "must be at least 1024"),
    ],
)
def test_the_new_server_keys_are_validated(upstream_url_free_config, key, value, message):
    from gateway.config.loader import load_config_text
    from gateway.errors import ConfigErrors

    with pytest.raises(ConfigErrors) as caught:
        load_config_text(upstream_url_free_config(f"{key}: {value}"), "gw.yaml", env={})
    assert f"server.{key}: {message}" in str(caught.value)


@pytest.fixture
def upstream_url_free_config():
    return lambda server: config_yaml("http://127.0.0.1:9", server=server)
