"""WebSocket sessions through the gateway, over real sockets: the real `websockets` client on
the client side, a real aiohttp WebSocket server (or the scripted SSE upstream) upstream.

Every wait is on an event, with a bound; a session must never end with a clean 1000 after
the upstream failed, and its concurrency units must come back however it ends."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets
from aiohttp import WSMsgType, web
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import config_yaml, http_upstream
from tests.support.scripted_upstream import Respond
from tests.test_admission import gauges_return_to_zero

WS_ROUTE = """\
websocket: {max_message_size: 1KiB, idle: 5s}
limits: [slots]
"""
SLOTS = "limits: {concurrency: {slots: {capacity: 10, weights: {stream: 3, unary: 1}}}}\n"


FLOOD_MESSAGE = b"x" * 32768


def chunk(text: str | None, finish: str | None = None) -> str:
    """An OpenAI chat-completion chunk, as Inferneo sends one per message."""
    delta = {} if text is None else {"content": text}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


class WsUpstream:
    """An aiohttp WebSocket server: /echo, /stream (three messages per message), /cut (one
    message, then the connection dropped), /silent (never answers), /big (answers 2 KiB),
    /answer (two OpenAI chunks, then one with finish_reason), /stall-mid-answer (one chunk,
    then silence), /reset (drops the connection on the first message), /flood (50 MiB),
    /mullama (Mullama-style tokens, then done; -cut, -1011 and -stall variants fail after
    the first token); it records the messages it got and how each session ended."""

    def __init__(self, behaviour: str | None = None) -> None:
        self.behaviour = behaviour
        """Behave as this path does, whatever the path asked (for a primary that fails)."""
        self.closed: asyncio.Queue[tuple[int | None, float]] = asyncio.Queue()
        self.protocols: list[str | None] = []
        self.received: list[str] = []
        self.sent_bytes = 0
        self.url = ""

    async def session(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("chat.v2",))
        await ws.prepare(request)
        self.protocols.append(ws.ws_protocol)
        path = self.behaviour or request.path
        try:
            async for msg in ws:
                self.received.append(msg.data)
                if path == "/reset":
                    request.transport.abort()
                    break
                if path.startswith("/mullama"):  # Mullama style: tokens, then done
                    await ws.send_json({"type": "token", "text": "a"})
                    if path == "/mullama-cut":
                        request.transport.abort()
                        break
                    if path == "/mullama-1011":
                        await ws.close(code=1011, message=b"backend crashed")
                        break
                    if path == "/mullama-stall":
                        continue
                    await ws.send_json({"type": "token", "text": "b\nc"})
                    await ws.send_json({"type": "done"})
                    continue
                if path == "/flood":  # 50 MiB as fast as the connection takes it
                    for _ in range(1600):
                        await ws.send_bytes(FLOOD_MESSAGE)
                        self.sent_bytes += len(FLOOD_MESSAGE)
                    continue
                if path == "/silent":
                    continue
                if path == "/big":
                    await ws.send_str("x" * 2048)
                    continue
                if path in ("/answer", "/stall-mid-answer"):
                    await ws.send_str(chunk("a"))
                    if path == "/answer":
                        await ws.send_str(chunk("b"))
                        await ws.send_str(chunk(None, "stop"))
                    continue
                if path == "/cut":
                    await ws.send_str("partial")
                    request.transport.abort()
                    break
                times = 3 if path == "/stream" else 1
                for i in range(times):
                    if msg.type is WSMsgType.TEXT:
                        await ws.send_str(msg.data if times == 1 else f"{msg.data}-{i}")
                    else:
                        await ws.send_bytes(msg.data)
        finally:  # also when the connection drops and the handler is cancelled
            self.closed.put_nowait((ws.close_code, time.monotonic()))
        return ws

    async def __aenter__(self) -> WsUpstream:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.session)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def ws_upstream():
    async with WsUpstream() as up:
        yield up


def ws_url(gw, path: str) -> str:
    return gw.url.replace("http://", "ws://") + path


async def gateway(start_gateway, url: str, route: str = WS_ROUTE, **kw):
    return await start_gateway(config_yaml(url, route=route, top=SLOTS, **kw))


async def test_echo_relays_text_and_binary_unchanged(start_gateway, ws_upstream, client):
    gw = await gateway(start_gateway, ws_upstream.url)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/echo"), subprotocols=["chat.v2"]) as ws:
            assert ws.subprotocol == "chat.v2"  # negotiated with the upstream, end to end
            await ws.send("héllo")
            assert await ws.recv() == "héllo"
            await ws.send(b"\x00\xffbin")
            assert await ws.recv() == b"\x00\xffbin"
    assert ws_upstream.protocols == ["chat.v2"]
    code, _ = await asyncio.wait_for(ws_upstream.closed.get(), 2)
    assert code == 1000  # the client's close carried across
    await gauges_return_to_zero(client, gw, "slots")


async def test_streaming_answers_arrive_in_order(start_gateway, ws_upstream, client):
    gw = await gateway(start_gateway, ws_upstream.url)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/stream")) as ws:
            for word in ("a", "b"):
                await ws.send(word)
                assert [await ws.recv() for _ in range(3)] == [f"{word}-{i}" for i in range(3)]
            async with client.get(gw.admin_url + "/admin/streams") as resp:
                (listed,) = (await resp.json())["streams"]  # listed like a stream
            assert (listed["route"], listed["protocol"]) == ("r", "websocket")
            assert (listed["messages_in"], listed["chunks"]) == (2, 6)
            live = await session_metrics(client, gw)  # counted while the session runs
    await gauges_return_to_zero(client, gw, "slots")
    ended = await session_metrics(client, gw)
    assert live == {
        'streamgate_active_websocket_sessions{route="r"}': 1.0,
        'streamgate_websocket_messages_total{direction="client_to_upstream",route="r"}': 2.0,
        'streamgate_websocket_messages_total{direction="upstream_to_client",route="r"}': 6.0,
    }
    assert ended == {
        'streamgate_websocket_messages_total{direction="client_to_upstream",route="r"}': 2.0,
        'streamgate_websocket_messages_total{direction="upstream_to_client",route="r"}': 6.0,
        'streamgate_websocket_sessions_total{outcome="completed",route="r"}': 1.0,
    }  # the client's own close completes a session


async def session_metrics(client, gw) -> dict[str, float]:
    async with client.get(gw.admin_url + "/metrics") as resp:
        lines = (await resp.text()).splitlines()
    samples = (line.rsplit(" ", 1) for line in lines if line.startswith("streamgate_"))
    return {name: float(v) for name, v in samples if "websocket" in name and "created" not in name}


async def test_failed_handshake_falls_back(start_gateway, ws_upstream, upstream, client):
    upstream.script(Respond(status=503, body=b"busy"))
    route = WS_ROUTE + "fallbacks: [good]\nretry: {attempts: 1}\n"
    gw = await gateway(
        start_gateway, upstream.url, route, extra_upstreams=http_upstream("good", ws_upstream.url)
    )
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/echo")) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
    assert len(upstream.requests) == 1
    await gauges_return_to_zero(client, gw, "slots")


FAILOVER = WS_ROUTE + "fallbacks: [good]\nretry: {attempts: 1}\ntimeouts: {first_chunk: 300ms}\n"


@pytest.mark.parametrize("failure", ["/silent", "/reset"], ids=["silence", "reset-after-101"])
async def test_failure_before_the_first_upstream_message_fails_over_with_replay(
    start_gateway, ws_upstream, client, failure
):
    """The primary accepts the session, then says nothing to the client's question (or drops
    the connection on it): the fallback gets the question replayed and answers it."""
    async with WsUpstream(behaviour=failure) as primary:
        gw = await gateway(
            start_gateway,
            primary.url,
            FAILOVER,
            extra_upstreams=http_upstream("good", ws_upstream.url),
        )
        async with asyncio.timeout(5):
            async with websockets.connect(ws_url(gw, "/echo"), subprotocols=["chat.v2"]) as ws:
                await ws.send("question")
                assert await ws.recv() == "question"  # the fallback's answer
                await ws.send("next")
                assert await ws.recv() == "next"
            await primary.closed.get()  # the failed primary's session was closed
        assert primary.received == ["question"]
        assert ws_upstream.received == ["question", "next"]  # replayed once, in order
        async with client.get(gw.admin_url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'streamgate_retries_total{reason="' in metrics
    await gauges_return_to_zero(client, gw, "slots")


async def test_a_refused_upgrade_after_the_client_is_connected_fails_over_too(
    start_gateway, ws_upstream, upstream, client
):
    """Silent primary, then a fallback that answers the upgrade with 503, then one that
    answers: the question goes to the third, the client never saw the 503."""
    upstream.script(Respond(status=503, body=b"busy"))
    route = FAILOVER.replace("fallbacks: [good]", "fallbacks: [busy, good]")
    async with WsUpstream(behaviour="/silent") as primary:
        gw = await gateway(
            start_gateway,
            primary.url,
            route,
            extra_upstreams=http_upstream("busy", upstream.url)
            + http_upstream("good", ws_upstream.url),
        )
        async with asyncio.timeout(5):
            async with websockets.connect(ws_url(gw, "/echo")) as ws:
                await ws.send("question")
                assert await ws.recv() == "question"
    assert len(upstream.requests) == 1
    assert ws_upstream.received == ["question"]
    await gauges_return_to_zero(client, gw, "slots")


async def test_messages_past_the_replay_buffer_wait_and_none_is_lost(
    start_gateway, ws_upstream, client
):
    route = FAILOVER.replace("idle: 5s", "idle: 5s, replay_buffer: 1KiB")
    async with WsUpstream(behaviour="/silent") as primary:
        gw = await gateway(
            start_gateway, primary.url, route, extra_upstreams=http_upstream("good", ws_upstream.url)
        )
        sent = [f"{i}" * 600 for i in range(4)]  # the buffer is full after the second
        async with asyncio.timeout(5):
            async with websockets.connect(ws_url(gw, "/echo")) as ws:
                for message in sent:
                    await ws.send(message)
                assert [await ws.recv() for _ in sent] == sent
        assert primary.received == sent[:2]  # the rest waited for the fallback's answer
        assert ws_upstream.received == sent
    await gauges_return_to_zero(client, gw, "slots")


async def test_failover_that_fails_everywhere_closes_1011(start_gateway, client):
    async with WsUpstream(behaviour="/silent") as primary, WsUpstream("/silent") as fallback:
        gw = await gateway(
            start_gateway, primary.url, FAILOVER, extra_upstreams=http_upstream("good", fallback.url)
        )
        async with asyncio.timeout(5):
            async with websockets.connect(ws_url(gw, "/echo")) as ws:
                await ws.send("anyone?")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
        assert fallback.received == ["anyone?"]
    assert closed.value.rcvd.code == 1011  # never a clean 1000
    assert closed.value.rcvd.reason.startswith("first_chunk_timeout: ")
    await gauges_return_to_zero(client, gw, "slots")


async def test_refused_everywhere_is_an_http_error(start_gateway, upstream, client):
    upstream.script(Respond(status=503, body=b"busy"), Respond(status=503, body=b"busy"))
    gw = await gateway(start_gateway, upstream.url, WS_ROUTE + "retry: {attempts: 2}\n")
    with pytest.raises(InvalidStatus) as refused:
        async with asyncio.timeout(5):
            await websockets.connect(ws_url(gw, "/echo"))
    assert refused.value.response.status_code == 503
    await gauges_return_to_zero(client, gw, "slots")


async def test_upstream_cut_mid_session_closes_1011(start_gateway, ws_upstream, client):
    gw = await gateway(start_gateway, ws_upstream.url)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/cut")) as ws:
            await ws.send("go")
            assert await ws.recv() == "partial"
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
    assert closed.value.rcvd.code == 1011  # never a clean 1000
    assert "reset" in closed.value.rcvd.reason
    await gauges_return_to_zero(client, gw, "slots")


async def test_client_close_closes_the_upstream_at_once(start_gateway, ws_upstream, client):
    gw = await gateway(start_gateway, ws_upstream.url)
    async with asyncio.timeout(5):
        ws = await websockets.connect(ws_url(gw, "/echo"))
        await ws.send("x")
        await ws.recv()
        started = time.monotonic()
        await ws.close(code=4001, reason="bye")
        code, at = await ws_upstream.closed.get()
    assert code == 4001  # the client's own code, carried across
    assert at - started < 0.5
    await gauges_return_to_zero(client, gw, "slots")


async def test_client_vanishing_closes_the_upstream(start_gateway, ws_upstream, client):
    gw = await gateway(start_gateway, ws_upstream.url)
    async with asyncio.timeout(5):
        ws = await websockets.connect(ws_url(gw, "/echo"))
        await ws.send("x")
        await ws.recv()
        started = time.monotonic()
        ws.transport.abort()  # no close frame: the TCP connection just goes
        _, at = await ws_upstream.closed.get()
    assert at - started < 0.5
    await gauges_return_to_zero(client, gw, "slots")


@pytest.mark.parametrize("size", [2048], ids=["over-1KiB"])
async def test_oversized_client_message_closes_1009(start_gateway, ws_upstream, client, size):
    gw = await gateway(start_gateway, ws_upstream.url)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/echo")) as ws:
            await ws.send("x" * size)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        code, _ = await ws_upstream.closed.get()
    assert closed.value.rcvd.code == 1009
    assert code == 1009
    await gauges_return_to_zero(client, gw, "slots")


async def test_oversized_upstream_message_closes_1009(start_gateway, ws_upstream, client):
    gw = await gateway(start_gateway, ws_upstream.url)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/big")) as ws:
            await ws.send("x")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        await ws_upstream.closed.get()
    assert closed.value.rcvd.code == 1009
    await gauges_return_to_zero(client, gw, "slots")


@pytest.mark.parametrize(
    ("send", "code", "condition"),
    [(False, 1001, "idle_timeout"), (True, 1011, "first_chunk_timeout")],
    ids=["idle-session", "unanswered-message"],
)
async def test_session_silence_is_bounded(
    start_gateway, ws_upstream, client, send, code, condition
):
    route = WS_ROUTE.replace("idle: 5s", "idle: 300ms") + "timeouts: {first_chunk: 300ms}\n"
    gw = await gateway(start_gateway, ws_upstream.url, route)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/silent")) as ws:
            if send:
                await ws.send("anyone?")
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        await ws_upstream.closed.get()
    assert (closed.value.rcvd.code, closed.value.rcvd.reason.split(":")[0]) == (code, condition)
    await gauges_return_to_zero(client, gw, "slots")


ANSWERS = WS_ROUTE.replace("idle: 5s", "idle: 5s, answer_end: finish_reason") + (
    "timeouts: {chunk_gap: 300ms}\n"
)


async def test_silence_in_the_middle_of_an_answer_closes_1011(start_gateway, ws_upstream, client):
    gw = await gateway(start_gateway, ws_upstream.url, ANSWERS)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/stall-mid-answer")) as ws:
            await ws.send("go")
            assert json.loads(await ws.recv())["choices"][0]["delta"] == {"content": "a"}
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        await ws_upstream.closed.get()
    assert closed.value.rcvd.code == 1011  # never a clean 1000
    assert closed.value.rcvd.reason.startswith("chunk_gap_timeout: ")
    await gauges_return_to_zero(client, gw, "slots")


async def test_a_finished_answer_rests_under_idle_not_chunk_gap(
    start_gateway, ws_upstream, client
):
    gw = await gateway(start_gateway, ws_upstream.url, ANSWERS)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/answer")) as ws:
            for _ in range(2):
                await ws.send("go")
                got = [json.loads(await ws.recv())["choices"][0] for _ in range(3)]
                assert got[-1]["finish_reason"] == "stop"
                await asyncio.sleep(0.6)  # twice chunk_gap, well within idle
    assert ws.close_code == 1000
    await gauges_return_to_zero(client, gw, "slots")


async def test_a_client_that_stops_reading_holds_the_upstream_back_then_slow_client_closes(
    start_gateway, ws_upstream, client
):
    """The client reads nothing after its question while the upstream floods: the gateway
    buffers at most its route's buffer (plus sockets), the upstream's writes block, and past
    slow_client the session ends: the upstream at once, the client with 1011."""
    route = (
        WS_ROUTE.replace("1KiB", "64KiB")
        + "timeouts: {slow_client: 500ms}\nbuffer: {chunks: 8, bytes: 256KiB}\n"
    )
    gw = await gateway(start_gateway, ws_upstream.url, route)
    async with asyncio.timeout(10):
        # max_queue=1: the client's library stops reading its socket once one message waits.
        async with websockets.connect(ws_url(gw, "/flood"), max_queue=1, max_size=None) as ws:
            await ws.send("go")
            await ws_upstream.closed.get()  # the gateway gave up on the session
            got = await messages_until_closed(ws)
    assert all(m == FLOOD_MESSAGE for m in got)
    # Kernel socket buffers on loopback hold a few MiB each way; the 50 MiB never moved.
    assert ws_upstream.sent_bytes < len(got) * len(FLOOD_MESSAGE) + 16 * 1024 * 1024
    assert ws.close_code == 1011  # the client learns why, once it reads again
    assert ws.close_reason.startswith("slow_client: ")
    async with client.get(gw.admin_url + "/metrics") as resp:
        assert 'streamgate_stream_errors_total{kind="slow_client",route="r"} 1.0' in await resp.text()
    await gauges_return_to_zero(client, gw, "slots")


async def test_plain_route_refuses_an_upgrade(start_gateway, ws_upstream, client):
    gw = await start_gateway(config_yaml(ws_upstream.url))
    with pytest.raises(InvalidStatus) as refused:
        async with asyncio.timeout(5):
            await websockets.connect(ws_url(gw, "/echo"))
    assert refused.value.response.status_code == 404
    assert ws_upstream.protocols == []  # no tunnel was opened


async def messages_until_closed(ws) -> list:
    got = []
    while True:
        try:
            got.append(await ws.recv())
        except ConnectionClosed:
            return got


def sse(*events: str) -> list[bytes]:
    return [f"data: {e}\n\n".encode() for e in events]


BRIDGE = "websocket: {upstream: sse}\nlimits: [slots]\n"


async def test_bridge_streams_sse_events_as_messages(start_gateway, upstream, client):
    chunks = [json.dumps({"choices": [{"delta": {"content": t}}]}) for t in ("a", "b")]
    upstream.script(
        Respond(headers={"Content-Type": "text/event-stream"}, chunks=sse(*chunks, "[DONE]"))
    )
    gw = await gateway(start_gateway, upstream.url, BRIDGE)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/v1/chat/completions")) as ws:
            await ws.send(json.dumps({"model": "m", "messages": []}))
            got = await messages_until_closed(ws)
            assert ws.close_code == 1000
    assert got == [*chunks, "[DONE]"]
    sent = upstream.requests[0]
    assert (sent.method, sent.json()["stream"]) == ("POST", True)
    await gauges_return_to_zero(client, gw, "slots")


async def test_bridge_cut_after_commit_closes_1011(start_gateway, upstream, client):
    from tests.support.scripted_upstream import Reset

    first = json.dumps({"choices": [{"delta": {"content": "a"}}]})
    upstream.script(
        Respond(headers={"Content-Type": "text/event-stream"}, chunks=[*sse(first), Reset()])
    )
    gw = await gateway(start_gateway, upstream.url, BRIDGE)
    async with asyncio.timeout(5):
        async with websockets.connect(ws_url(gw, "/v1/chat/completions")) as ws:
            await ws.send(json.dumps({"model": "m"}))
            got = await messages_until_closed(ws)
            assert ws.close_code == 1011
    assert got[0] == first
    assert "error" in got[-1]  # the error event's data, as a last message
    await gauges_return_to_zero(client, gw, "slots")
