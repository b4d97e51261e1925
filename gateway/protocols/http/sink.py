"""The HTTP/1.1 server side of one request: the engine's `Sink` over an aiohttp response.

Headers are held until the first frames are in hand and go out in one write with them. After
that, frames are written straight to the client's transport (chunk-framed when the response is
chunked): no coroutine per chunk. The transport's write buffer is the engine's bounded buffer.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened
from gateway.errors import GatewayError, InternalError, RequestTimeout
from gateway.protocols.http.errors import error_response
from gateway.protocols.http.headers import add_rate_limit_headers, client_response_headers

_SIZED = 2048
_CHUNK_SIZES = tuple(b"%x\r\n" % size for size in range(_SIZED))
"""Chunk-size lines made once: formatting one costs more than the rest of a small write."""


class HttpSink:
    __slots__ = ("request", "ctx", "response", "transport", "write", "buffered", "closing")
    receive = None  # HTTP/1.1 is one request, one answer: nothing more comes from the client

    def __init__(self, request: web.BaseRequest, ctx: RequestContext) -> None:
        self.request = request
        self.ctx = ctx
        self.response: web.StreamResponse | None = None
        """What the handler returns to aiohttp."""
        self.transport: asyncio.Transport | None = None

    async def refuse(self, err: GatewayError) -> None:
        ctx = self.ctx
        response = error_response(err, ctx.request_id)
        add_rate_limit_headers(response.headers, ctx.rate_remaining, ctx.token_budget)
        self.response = response
        if isinstance(err, RequestTimeout) or self.request.content.exception() is not None:
            await self._send_and_close(response)
        elif isinstance(err, InternalError):
            response.force_close()

    async def _send_and_close(self, response: web.Response) -> None:
        """The rest of the body is not coming, or is garbage: answer, then close at once,
        rather than let aiohttp linger reading a body nobody wants (that would hold a slow
        client's connection for its `lingering_time` more)."""
        response.force_close()
        await response.prepare(self.request)
        await response.write_eof()
        if self.request.transport is not None:
            self.request.transport.close()  # after the buffered answer is flushed

    async def send_whole(self, opened: Opened) -> None:
        response = web.Response(
            status=opened.status, headers=self._headers(opened), body=opened.head
        )
        self.response = response
        await response.prepare(self.request)
        await response.write_eof()

    async def commit(self, opened: Opened, first: bytes) -> None:
        response = web.StreamResponse(status=opened.status, headers=self._headers(opened))
        response._send_headers_immediately = False  # they go out with the first frames
        self.response = response
        await response.prepare(self.request)
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        writer = response._payload_writer  # aiohttp has no public "flush headers with"
        if first:
            await writer.write(first, drain=False)
        else:
            writer.send_headers()
        self.transport = transport
        self.buffered = transport.get_write_buffer_size
        self.closing = transport.is_closing
        if writer.chunked:  # set by prepare() for HTTP/1.1
            send, join, sizes = transport.write, b"".join, _CHUNK_SIZES
            self.write = lambda data: send(
                join((sizes[len(data)], data, b"\r\n"))
                if len(data) < _SIZED
                else b"%x\r\n%b\r\n" % (len(data), data)
            )
        else:
            self.write = transport.write

    def _headers(self, opened: Opened):
        sse = opened.headers.get("content-type", "").startswith("text/event-stream")
        headers = client_response_headers(opened.headers, self.ctx.request_id, sse)
        add_rate_limit_headers(headers, self.ctx.rate_remaining, self.ctx.token_budget)
        return headers

    async def drain(self) -> None:
        """Wait until the client has taken every buffered byte.

        Lowering the transport's high-water mark to zero pauses it at once; aiohttp's drain
        then waits for the transport to resume, which it does when its buffer is empty.
        """
        transport = self.transport
        high, low = transport.get_write_buffer_limits()[::-1]
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await self.response._payload_writer.drain()  # no public drain that does not warn
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    async def finish(self, tail: bytes) -> None:
        if tail:
            await self.response.write(tail)
        await self.response.write_eof()

    async def fail(self, last_frame: bytes | None) -> None:
        transport = self.request.transport
        if last_frame is not None and transport is not None and not transport.is_closing():
            self.response.force_close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await self.response.write(last_frame)
                await self.response.write_eof()
        elif transport is not None:
            transport.abort()
