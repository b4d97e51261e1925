"""The scripted upstream does exactly what its script says, byte for byte and failure for failure.

Driven with aiohttp's client where a real client's view matters, and with raw sockets where
the bytes on the wire (or a TCP RST versus a FIN) are the point.
"""

import asyncio
import contextlib
import time

import aiohttp
import pytest

from tests.support.scripted_upstream import (
    Close,
    CloseBeforeHeaders,
    NoResponse,
    Raw,
    RawResponse,
    Reset,
    ResetBeforeHeaders,
    Respond,
    ScriptedUpstream,
    Sleep,
    Stall,
    WaitFor,
    content,
    done,
    error_body,
    role_delta,
    sse_tokens,
    usage_chunk,
)


@pytest.fixture
async def up():
    async with ScriptedUpstream() as upstream:
        yield upstream


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


def http_request(path="/", headers=(), body=b"", method="POST"):
    lines = [f"{method} {path} HTTP/1.1", "Host: upstream", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def raw_connection(up, request=b""):
    reader, writer = await asyncio.open_connection("127.0.0.1", up.port)
    writer.write(request)
    await writer.drain()
    return reader, writer


async def read_to_eof(reader):
    async with asyncio.timeout(2):
        return await reader.read()


# ------------------------------------------------------------------- streaming and framing


async def test_chunked_sse_arrives_one_chunk_at_a_time(up, session):
    gate = asyncio.Event()
    items = sse_tokens(["hi ", "there"])
    up.script(Respond(sse=True, chunks=[items[0], items[1], WaitFor(gate), *items[2:]]))

    async with session.post(up.url + "/v1/chat/completions", json={}) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Transfer-Encoding"] == "chunked"
        # The server is parked on the gate: these two chunks came before the rest was sent.
        assert await resp.content.readchunk() == (role_delta(), True)
        assert await resp.content.readchunk() == (content("hi "), True)
        gate.set()
        assert await resp.read() == b"".join(items[2:])
    assert items[-1] == done()


async def test_sleep_delays_the_next_chunk(up, session):
    up.script(Respond(sse=True, chunks=[content("a"), Sleep(0.1), content("b")]))

    async with session.get(up.url) as resp:
        await resp.content.readchunk()
        first_at = time.monotonic()
        assert await resp.content.readchunk() == (content("b"), True)
        assert time.monotonic() - first_at >= 0.09


@pytest.mark.parametrize(
    ("response", "content_length", "transfer_encoding", "body"),
    [
        (Respond(body=b"hello"), "5", None, b"hello"),
        (Respond(chunks=[b"he", b"llo"], content_length=True), "5", None, b"hello"),
        (Respond(chunks=[b"he", "llo"]), None, "chunked", b"hello"),
        (Respond(chunks=[b"he", b"llo"], chunked=False), None, None, b"hello"),
        (Respond(json={"ok": True}), "12", None, b'{"ok": true}'),
    ],
    ids=["body", "content-length-items", "chunked", "close-delimited", "json"],
)
async def test_response_framing(up, session, response, content_length, transfer_encoding, body):
    up.script(response)

    async with session.get(up.url) as resp:
        assert resp.headers.get("Content-Length") == content_length
        assert resp.headers.get("Transfer-Encoding") == transfer_encoding
        assert await resp.read() == body


@pytest.mark.parametrize(
    ("response", "content_type"),
    [
        (Respond(sse=True, chunks=[done()]), "text/event-stream"),
        (Respond(json={}), "application/json"),
        (Respond(sse=True, headers={"Content-Type": "text/plain"}), "text/plain"),
        (Respond(body=b"x"), None),
    ],
    ids=["sse", "json", "explicit-header-wins", "none-by-default"],
)
async def test_content_type_follows_the_body_kind(up, session, response, content_type):
    up.script(response)

    async with session.get(up.url) as resp:
        await resp.read()
        assert resp.headers.get("Content-Type") == content_type


async def test_headers_are_sent_verbatim(up):
    hop_by_hop = [
        ("Connection", "x-secret"),
        ("X-Secret", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Authenticate", "Basic"),
    ]
    up.script(Respond(status=429, headers=hop_by_hop, body=b"{}", reason="Slow Down"))

    reader, writer = await raw_connection(up, http_request())
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()

    assert head == (
        b"HTTP/1.1 429 Slow Down\r\nConnection: x-secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nContent-Length: 2\r\n\r\n"
    )


async def test_sse_helpers_build_openai_chunks():
    assert role_delta(model="gpt").startswith(b'data: {"id":"chatcmpl-scripted"')
    assert b'"delta":{"role":"assistant","content":""}' in role_delta()
    assert b'"model":"gpt"' in content("x", model="gpt")
    assert b'"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}' in usage_chunk(
        3, 4
    )
    assert sse_tokens(["a"], role_first=False, done=False, finish_reason=None) == [content("a")]
    assert error_body("no", code="context_length_exceeded") == (
        b'{"error": {"message": "no", "type": "invalid_request_error", "param": null, '
        b'"code": "context_length_exceeded"}}'
    )


# ------------------------------------------------------------------- connections and requests


async def test_keep_alive_reuses_one_connection(up):
    up.script(Respond(body=b"one"), Respond(sse=True, chunks=[content("two")]))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as client:
        for _ in range(2):
            async with client.get(up.url) as resp:
                await resp.read()
        first, second = await up.wait_for_requests(2)
        assert first.connection_id == second.connection_id
        assert up.connections_accepted == up.open_connections == 1

    await up.wait_connections_closed(timeout=1)
    [event] = up.closed_events
    assert event.connection_id == first.connection_id and not event.mid_response


async def chunked_upload():
    yield b'{"model": '
    yield b'"m"}'


CHAT = "/v1/chat/completions"
MODEL_M = b'{"model": "m"}'


@pytest.mark.parametrize(
    ("method", "path", "send", "body", "framing_header"),
    [
        ("POST", CHAT, {"json": {"model": "m"}}, MODEL_M, "Content-Length"),
        ("POST", CHAT, {"data": chunked_upload}, MODEL_M, "Transfer-Encoding"),
        ("POST", CHAT, {"json": {"model": "m"}, "expect100": True}, MODEL_M, "Expect"),
        ("GET", "/v1/models?limit=1", {}, b"", None),
    ],
    ids=["content-length-body", "chunked-upload", "expect-100-continue", "get-with-query"],
)
async def test_requests_are_recorded(up, session, method, path, send, body, framing_header):
    if "data" in send:
        send = {"data": send["data"]()}  # a fresh generator per run
    async with session.request(method, up.url + path, headers={"X-Test": "1"}, **send) as resp:
        await resp.read()

    [request] = up.requests
    assert (request.method, request.path, request.body) == (method, path, body)
    assert request.headers["x-test"] == "1"
    assert request.headers["HOST"] == f"127.0.0.1:{up.port}"
    if framing_header:
        assert framing_header in request.headers
    assert request.response_bytes > 0


async def test_connection_close_request_is_honoured(up):
    up.script(Respond(body=b"bye"))

    reader, writer = await raw_connection(up, http_request(headers=[("Connection", "close")]))
    response = await read_to_eof(reader)
    writer.close()

    assert response.endswith(b"\r\n\r\nbye")
    await up.wait_connections_closed(timeout=1)
    assert up.closed_events == []  # the server closed it, not the peer


# ------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "response",
    [
        ResetBeforeHeaders(),
        Respond(chunks=[b"partial", Reset()]),
        CloseBeforeHeaders(),
        Respond(chunks=[b"partial", Close()]),
        Respond(chunks=[b"abc", Close()], content_length=10),
    ],
    ids=[
        "reset-before-headers",
        "reset-mid-body",
        "close-before-headers",
        "close-mid-chunked-body",
        "close-short-of-content-length",
    ],
)
async def test_failures_reach_the_client_as_errors(up, session, response):
    up.script(response)

    # POST: aiohttp silently retries idempotent methods once after a disconnect.
    with pytest.raises(aiohttp.ClientError) as caught:
        async with session.post(up.url) as resp:
            await resp.read()

    if isinstance(response, Respond):
        assert isinstance(caught.value, aiohttp.ClientPayloadError)  # incomplete body


@pytest.mark.parametrize(
    ("response", "expect_reset"),
    [
        (ResetBeforeHeaders(), True),
        (Respond(chunks=[b"partial", Reset()]), True),
        (CloseBeforeHeaders(), False),
        (Respond(chunks=[b"partial", Close()]), False),
    ],
    ids=["reset-before-headers", "reset-mid-body", "close-before-headers", "close-mid-body"],
)
async def test_reset_is_a_tcp_rst_and_close_is_a_fin(up, response, expect_reset):
    up.script(response)

    reader, writer = await raw_connection(up, http_request())
    if expect_reset:
        with pytest.raises(ConnectionResetError):
            await read_to_eof(reader)
    else:
        await read_to_eof(reader)  # a clean end of stream
    writer.close()
    await up.wait_connections_closed(timeout=1)


@pytest.mark.parametrize(
    "response",
    [
        Respond(chunks=[b"good", Raw(b"zz\r\nbad\r\n"), Close()]),
        RawResponse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n4\r\ngood\r\n", b"zz\r\nbad\r\n"),
    ],
    ids=["raw-inside-chunked-body", "raw-response"],
)
async def test_raw_bytes_reach_the_client_unframed(up, response):
    up.script(response)

    reader, writer = await raw_connection(up, http_request())
    received = await read_to_eof(reader)
    writer.close()

    assert received.endswith(b"\r\n\r\n4\r\ngood\r\nzz\r\nbad\r\n")


async def test_stall_records_when_the_client_closes(up, session):
    up.script(Respond(sse=True, chunks=[content("a"), Stall()]))

    resp = await session.get(up.url)
    assert await resp.content.readchunk() == (content("a"), True)
    closed_at = time.monotonic()
    resp.close()

    [event] = await up.wait_for_closed_events(1, timeout=1)
    await up.wait_connections_closed(timeout=1)
    assert event.connection_id == up.requests[0].connection_id
    assert event.mid_response
    assert closed_at <= event.at < closed_at + 0.5


async def test_no_response_holds_the_connection_until_the_peer_closes(up):
    up.script(NoResponse())

    reader, writer = await raw_connection(up, http_request())
    await up.wait_for_requests(1)
    with pytest.raises(TimeoutError):  # bounded check that nothing is sent
        await asyncio.wait_for(reader.read(1), 0.1)
    assert up.open_connections == 1
    writer.close()

    [event] = await up.wait_for_closed_events(1)
    assert event.mid_response
    await up.wait_connections_closed(timeout=1)


async def wait_forever(request):
    await asyncio.Event().wait()


@pytest.mark.parametrize(
    ("script", "request_bytes", "read_head", "mid_response"),
    [
        (None, b"POST / HTTP/1.1\r\nHost: x", False, False),
        (None, http_request(body=b"0123456789")[:-4], False, False),
        (Respond(delay=30, body=b"late"), http_request(), False, True),
        (Respond(chunks=[b"a", Sleep(30), b"b"]), http_request(), True, True),
        (Respond(chunks=[b"a", WaitFor(asyncio.Event()), b"b"]), http_request(), True, True),
        (Respond(chunks=[b"a", Stall()]), http_request(), True, True),
        (NoResponse(), http_request(), False, True),
        (wait_forever, http_request(), False, True),
    ],
    ids=[
        "partial-head",
        "partial-body",
        "before-headers-delay",
        "during-sleep",
        "during-wait-for",
        "during-stall",
        "no-response",
        "during-slow-handler",
    ],
)
async def test_peer_close_at_any_point_ends_quietly(
    up, script, request_bytes, read_head, mid_response
):
    if script is not None:
        up.script(script)
    reader, writer = await raw_connection(up, request_bytes)
    if mid_response:
        await up.wait_for_requests(1)
    if read_head:
        await reader.readuntil(b"\r\n\r\n")
    writer.close()

    [event] = await up.wait_for_closed_events(1)
    await up.wait_connections_closed(timeout=1)  # a 30 s sleep does not hold the connection
    assert event.mid_response == mid_response
    assert up.errors == []


async def test_stop_closes_connections_and_leaves_no_tasks():
    up = await ScriptedUpstream().start()
    up.script(Respond(chunks=[b"a", Stall()]), wait_forever)
    first = await raw_connection(up, http_request())
    second = await raw_connection(up, http_request())
    await up.wait_for_requests(2)

    await up.stop()

    assert up.open_connections == 0
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    for reader, writer in (first, second):
        with contextlib.suppress(ConnectionResetError):  # abort may send RST or FIN
            await read_to_eof(reader)
        writer.close()


# ------------------------------------------------------------------- scripting


async def answer_by_model(request):
    if request.json()["model"] == "small":
        return Respond(status=400, body=error_body("too long", code="context_length_exceeded"))
    return Respond(body=b"ok")


def answer_by_model_sync(request):
    if request.json()["model"] == "small":
        return Respond(status=400, body=error_body("too long", code="context_length_exceeded"))
    return Respond(body=b"ok")


@pytest.mark.parametrize("handler", [answer_by_model, answer_by_model_sync], ids=["async", "sync"])
async def test_callable_response_branches_on_the_request(up, session, handler):
    up.default = handler

    statuses = {}
    for model in ("small", "large"):
        async with session.post(up.url, json={"model": model}) as resp:
            statuses[model] = (resp.status, await resp.read())

    assert statuses["small"][0] == 400 and b"context_length_exceeded" in statuses["small"][1]
    assert statuses["large"] == (200, b"ok")


@pytest.mark.parametrize(
    ("default", "status", "body_part"),
    [(None, 500, b"script exhausted"), (Respond(status=503, body=b"custom"), 503, b"custom")],
    ids=["builtin-default", "custom-default"],
)
async def test_default_answers_once_the_script_is_used_up(up, session, default, status, body_part):
    if default is not None:
        up.default = default
    up.script(Respond(status=201, body=b"scripted"))

    seen = []
    for _ in range(2):
        async with session.get(up.url) as resp:
            seen.append((resp.status, await resp.read()))

    assert seen[0] == (201, b"scripted")
    assert seen[1][0] == status and body_part in seen[1][1]
    assert up.pending == 0


async def test_handler_errors_fail_the_test(session):
    def broken(request):
        raise RuntimeError("bug in the test's handler")

    with pytest.raises(AssertionError, match="saw errors") as caught:
        async with ScriptedUpstream() as up:
            up.script(broken)
            with pytest.raises(aiohttp.ClientError):
                async with session.post(up.url) as resp:
                    await resp.read()
    assert isinstance(caught.value.__cause__, RuntimeError)


async def test_malformed_request_gets_400_and_is_recorded(session):
    async with ScriptedUpstream(raise_errors=False) as up:
        reader, writer = await raw_connection(up, b"NONSENSE\r\n\r\n")
        response = await read_to_eof(reader)
        writer.close()

    assert response.startswith(b"HTTP/1.1 400 ")
    assert "bad request line" in str(up.errors[0])


async def test_waits_time_out_with_the_state_in_the_message(up):
    with pytest.raises(TimeoutError, match="2 requests.*requests=0"):
        await up.wait_for_requests(2, timeout=0.05)


def test_script_rejects_what_is_not_a_response():
    with pytest.raises(TypeError):
        ScriptedUpstream().script(b"not a response")
