"""The client side of one WebSocket session: the engine's `Sink` over an aiohttp
WebSocketResponse.

Passthrough (`websocket.upstream: websocket`): the client is upgraded when the first try's
upstream accepts (`open`), so the subprotocol it chose is the one the client gets; frames
are message envelopes, written as WebSocket frames straight to the transport (whose buffer is
the engine's bounded buffer); the upstream's close is carried across. Bridge (`sse`): the
client was upgraded once admitted (it must be, to send its request), frames are SSE events,
each `data` goes out as a text message, and the end is `end_message` and a 1000 close.

Before the upgrade a refusal is an HTTP error, as for any request; after it, a close with
1011 (1013 when overloaded) and the reason, never a clean 1000.
"""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web
from aiohttp.http_websocket import WebSocketError

from gateway.config.routes import WebSocketConfig
from gateway.engine import messages
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened
from gateway.errors import GatewayError, UpstreamReset
from gateway.protocols.http.errors import error_response
from gateway.protocols.http.headers import add_rate_limit_headers
from gateway.protocols.ws import frames
from gateway.protocols.ws.sse_events import DONE, event_data


class WsSink:
    __slots__ = (
        "request",
        "ctx",
        "config",
        "ws",
        "response",
        "transport",
        "write",
        "buffered",
        "closing",
        "_close",
    )

    def __init__(self, request: web.BaseRequest, ctx: RequestContext) -> None:
        self.request = request
        self.ctx = ctx
        self.config: WebSocketConfig | None = None
        """The route's, once routed."""
        self.ws: web.WebSocketResponse | None = None
        self.response: web.StreamResponse | None = None
        """What the handler returns to aiohttp: an error answer, or the session."""
        self._close: tuple[int, str] | None = None
        """The upstream's close, carried to the client at the end."""

    @property
    def bridge(self) -> bool:
        return self.config is not None and self.config.upstream == "sse"

    async def accept(self, protocol: str | None = None) -> None:
        """Upgrade the client (once): no compression, so frames go out as built."""
        ws = web.WebSocketResponse(
            protocols=(protocol,) if protocol else (),
            compress=False,
            max_msg_size=self.config.max_message_size,
            autoping=True,  # pings are answered per hop
        )
        await ws.prepare(self.request)
        self.ws = self.response = ws
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.transport = transport
        self.buffered = transport.get_write_buffer_size
        self.closing = lambda: transport.is_closing() or ws.closed
        self.write = self._write_events if self.bridge else self._write_messages

    async def open(self, headers) -> None:
        """A passthrough try's upstream accepted: the first upgrades the client with the
        subprotocol it chose; a later one (replaying the session) must have chosen the same."""
        chosen = headers.get("sec-websocket-protocol")
        if self.ws is None:
            await self.accept(chosen)
        elif chosen != self.ws.ws_protocol:
            had = self.ws.ws_protocol
            raise UpstreamReset(f"the upstream chose subprotocol {chosen!r}, the session {had!r}")

    async def refuse(self, err: GatewayError) -> None:
        if self.ws is None:
            response = error_response(err, self.ctx.request_id)
            add_rate_limit_headers(response.headers, self.ctx.rate_remaining)
            self.response = response
            return
        await self._end(messages.error_code(err), messages.error_reason(err))

    async def send_whole(self, opened: Opened) -> None:
        if self.ws is None:  # a refused handshake, relayed as the upstream answered
            self.response = web.Response(status=opened.status, body=opened.head)
            return
        if opened.head:  # a bridge whose upstream answered in one piece
            self.transport.write(frames.text(opened.head))
        failed = opened.status >= 400
        code = messages.INTERNAL_ERROR if failed else messages.NORMAL
        await self._end(code, f"upstream answered {opened.status}" if failed else "")

    async def commit(self, opened: Opened, first: bytes) -> None:
        if self.ws is None:
            await self.accept(opened.headers.get("sec-websocket-protocol"))
        if first:
            self.write(first)

    def _write_messages(self, data: bytes) -> None:
        write = self.transport.write
        for kind, payload in messages.split(data):
            if kind == messages.CLOSE:
                self._close = messages.close_of(payload)
            else:
                write(frames.data_frame(kind, payload))

    def _write_events(self, data: bytes) -> None:
        for payload in event_data(data):
            if payload == DONE:
                self._close = (messages.NORMAL, "")
            else:
                self.transport.write(frames.text(payload))

    async def receive(self) -> bytes:
        msg = await self.ws.receive()
        kind = msg.type
        if kind is WSMsgType.TEXT:
            return messages.envelope(messages.TEXT, msg.data.encode())
        if kind is WSMsgType.BINARY:
            return messages.envelope(messages.BINARY, msg.data)
        if kind is WSMsgType.CLOSE:
            return messages.close_envelope(msg.data, msg.extra or "")
        if kind is WSMsgType.ERROR and isinstance(msg.data, WebSocketError):
            return messages.close_envelope(msg.data.code, "client message refused")
        if kind is WSMsgType.CLOSING:
            return b""  # the session is ending from this side
        return messages.close_envelope(messages.GOING_AWAY, "client went away")

    async def drain(self) -> None:
        """Wait until the client has taken every buffered byte (as HttpSink.drain)."""
        transport = self.transport
        high, low = transport.get_write_buffer_limits()[::-1]
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await self.request.protocol._drain_helper()  # aiohttp has no public drain here
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    async def finish(self, tail: bytes) -> None:
        if self.bridge and self.config.end_message is not None:
            self.transport.write(frames.text(self.config.end_message.encode()))
        await self._end(*(self._close or (messages.NORMAL, "")))

    async def fail(self, last_frame: bytes | None) -> None:
        if self.bridge and last_frame is not None:
            for payload in event_data(last_frame):
                self.transport.write(frames.text(payload))
            last_frame = None
        code, reason = messages.INTERNAL_ERROR, "the upstream stream failed"
        if last_frame is not None:
            for kind, payload in messages.split(last_frame):
                if kind == messages.CLOSE:
                    code, reason = messages.close_of(payload)
        await self._end(code, reason)

    async def _end(self, code: int, reason: str) -> None:
        if self.ws.closed or self.transport.is_closing():
            return
        try:
            async with asyncio.timeout(1.0):  # a client that does not answer the close
                await self.ws.close(code=code, message=reason.encode()[:123])
        except TimeoutError:
            self.transport.abort()
