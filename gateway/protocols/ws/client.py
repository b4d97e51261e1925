"""The WebSocket upstream client: one session per try, over the pool's HTTP session.

A handshake is an exchange like any other for the engine: a connect failure is
`UpstreamConnectError`, an answer other than 101 is that status (an error body is not read:
aiohttp does not keep it), and a dropped connection is `reset`. After the 101 a session's
response (`WsResponse`) is read as message envelopes (`engine/messages.py`), and `send` carries
the client's envelopes the other way.

An HTTP route bridged to a WebSocket upstream (`websocket_upstream`) gets `SseOverWs` instead:
the request body goes out as the first text message, and from then on each upstream message is
read as one SSE event `data: <message>` (a message with line breaks is one event of several
`data:` lines, which SSE joins back), so the engine's SSE framing does the rest as for any SSE
upstream: it commits on the first event with content (an OpenAI role-only delta does not),
counts events, keeps `chunk_gap`, and shows a failure after the commit point as `event:
error`. The end message (`answer_end`) is relayed too and ends the body cleanly, after `data:
[DONE]` when `done_event` is set; so does a 1000 close. Any other close, a lost connection or
an oversized message is a cut: before the first event with content a `reset` (retried), after
it an `event: error`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.config.routes import WebSocketUpstream
from gateway.engine import messages
from gateway.engine.answer_end import end_test
from gateway.engine.exchange import ROUTE
from gateway.engine.framing import Messages, Sse
from gateway.errors import UpstreamConnectError
from gateway.protocols.http.client import REQUEST_SENT, HttpClient

_REQUEST_BODY = frozenset({"content-length", "content-type", "transfer-encoding", "expect"})
"""A bridged request's body headers: its body goes as a message, not on the upgrade request."""
DONE_EVENT = b"data: [DONE]\n\n"
_SSE_HEADERS = CIMultiDictProxy(CIMultiDict({"Content-Type": "text/event-stream"}))
_UNSENDABLE = {1005: messages.NORMAL, 1006: messages.GOING_AWAY, 1015: messages.GOING_AWAY}
"""Close codes that describe a close but may not be sent in one (RFC 6455 7.4.1)."""


class WsClient:
    """A pool's WebSocket side: shares the pool's HTTP client session and its connect hook."""

    broken = (aiohttp.ClientError, ConnectionError)

    def __init__(self, http: HttpClient) -> None:
        self.http = http

    async def start(self) -> None:
        """The HTTP client's session is started with the pool."""

    async def close(self) -> None:
        """Closed with the HTTP client's session."""

    def drop_idle(self, endpoint) -> None:
        """WebSocket connections are never pooled."""

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        connect_timeout: float,
        on_sent: Callable[[bool], None],
        deadline: float = float("inf"),
    ):
        pool, route = self.http.pool, ROUTE.get()
        bridge = route.websocket is None  # an HTTP client: the answer is read as SSE
        config = route.websocket_upstream if bridge else route.websocket
        forward = CIMultiDict(
            (k, v)
            for k, v in headers.items()
            if not k.lower().startswith("sec-websocket-") and k.lower() not in _REQUEST_BODY
        )
        for name, value in pool.headers:
            forward[name] = value
        offered = headers.get("sec-websocket-protocol", "")
        protocols = [p.strip() for p in offered.split(",") if p.strip()]
        sent = REQUEST_SENT.set(on_sent)
        try:
            ws = await self.http.session.ws_connect(
                URL("ws" + url[4:] if url.startswith("http") else url, encoded=True),
                protocols=protocols,
                headers=forward,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=connect_timeout),
                autoclose=bridge,  # a session's close is answered once both sides know
                autoping=True,  # pings are answered per hop
                max_msg_size=config.max_message_size,
                compress=0,  # messages are relayed as they come, never recompressed
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status >= 400:
                return _Refused(exc.status, exc.headers or {})
            raise ConnectionResetError(f"upstream refused the WebSocket upgrade: {exc}") from exc
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            refused = isinstance(getattr(exc, "os_error", None), ConnectionRefusedError)
            message = f"cannot connect to upstream {pool.name!r}: {exc}"
            raise UpstreamConnectError(message, refused=refused) from exc
        finally:
            REQUEST_SENT.reset(sent)
        if bridge:
            response = SseOverWs(ws, config)
            try:
                await ws.send_frame(body, aiohttp.WSMsgType.TEXT)  # the request: one message
            except BaseException:
                response.close()
                raise
            return response
        return WsResponse(ws, Messages(end_test(config.answer_end)))


class _Refused:
    """A handshake answered with an error status: judged by the engine like any other."""

    framing = None
    send = None
    stream = None
    conditions = ()

    def __init__(self, status: int, headers) -> None:
        self.status, self.headers = status, headers

    async def read(self) -> bytes:
        return b""

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class WsResponse:
    """An open upstream WebSocket as the engine reads it: one envelope per message."""

    status = 101
    stream = None  # pulled: one message envelope per read
    conditions = ()
    __slots__ = ("ws", "headers", "framing", "_ended", "_we_closed")

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, framing: Messages) -> None:
        self.ws = ws
        self.headers = ws._response.headers  # the handshake's: the subprotocol chosen
        self.framing = framing
        self._ended = False
        self._we_closed = False

    async def read(self) -> bytes:
        if self._ended:
            return b""
        msg = await self.ws.receive()
        kind = msg.type
        if kind is aiohttp.WSMsgType.TEXT:
            return messages.envelope(messages.TEXT, msg.data.encode())
        if kind is aiohttp.WSMsgType.BINARY:
            return messages.envelope(messages.BINARY, msg.data)
        self._ended = True
        if kind is aiohttp.WSMsgType.CLOSE:
            if not self._we_closed:
                code = _UNSENDABLE.get(msg.data, msg.data)
                await self.ws.close(code=code, message=(msg.extra or "").encode())
            return messages.close_envelope(msg.data, msg.extra or "")
        if kind is aiohttp.WSMsgType.ERROR and getattr(msg.data, "code", None) == messages.TOO_BIG:
            return messages.close_envelope(messages.TOO_BIG, "upstream message too big")
        if self._we_closed:
            return b""
        # Gone without a close frame: a cut, never a clean end. (Not a ConnectionResetError:
        # the relay reads that as the *client* gone.)
        raise aiohttp.ServerDisconnectedError(f"upstream WebSocket lost ({msg.data or kind.name})")

    async def send(self, envelope: bytes) -> None:
        kind, payload = envelope[0], envelope[messages.HEAD_SIZE :]
        if kind == messages.CLOSE:
            code, reason = messages.close_of(payload)
            code = _UNSENDABLE.get(code, code)
            self._we_closed = True
            # Sent at once, so the upstream stops; its answering close ends the relay.
            payload = struct.pack(">H", code) + reason.encode()[:123]
            await self.ws.send_frame(payload, aiohttp.WSMsgType.CLOSE)
            return
        opcode = aiohttp.WSMsgType.TEXT if kind == messages.TEXT else aiohttp.WSMsgType.BINARY
        await self.ws.send_frame(payload, opcode)

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        # The upgraded connection is detached from the response (closing that alone leaves
        # it open): close its transport, after whatever close frame is queued, so the
        # upstream sees the session end at once.
        self.ws._response.close()
        self.ws._writer.transport.close()


class SseOverWs:
    """An open upstream WebSocket read as an SSE body (see the module's docstring)."""

    status = 200
    headers = _SSE_HEADERS
    send = None  # one request, one answer: nothing more goes upstream
    stream = None  # pulled: one answer message per read
    __slots__ = ("ws", "framing", "_ends", "_done", "_ended")

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, config: WebSocketUpstream) -> None:
        self.ws = ws
        self.framing = Sse()
        self._ends = end_test(config.answer_end)
        self._done = DONE_EVENT if config.done_event else b""
        self._ended = False

    async def read(self) -> bytes:
        if self._ended:
            if not self.ws.closed:  # after the end message: a clean close, then the end
                await self.ws.close()
            return b""
        msg = await self.ws.receive()
        if msg.type is aiohttp.WSMsgType.TEXT:
            payload = msg.data.encode()
        elif msg.type is aiohttp.WSMsgType.BINARY:
            payload = msg.data
        else:
            return self._closed(msg)
        ended = self._ended = self._ends(payload)
        if b"\n" in payload or b"\r" in payload:
            payload = b"\ndata: ".join(payload.splitlines())
        event = b"data: " + payload + b"\n\n"
        return event + self._done if ended else event

    def _closed(self, msg: aiohttp.WSMessage) -> bytes:
        self._ended = True
        if msg.type is aiohttp.WSMsgType.CLOSE and msg.data == messages.NORMAL:
            return self._done  # the upstream's own clean end
        if msg.type is aiohttp.WSMsgType.CLOSE:
            what = f"closed the WebSocket with {msg.data} {msg.extra or ''}".rstrip()
        else:
            what = f"lost the WebSocket ({msg.data or msg.type.name})"
        # Never a clean end: the engine reads this as a cut (a reset before the commit point).
        raise aiohttp.ServerDisconnectedError(f"upstream {what} before its end message")

    release = WsResponse.release
    close = WsResponse.close
