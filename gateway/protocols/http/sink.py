"""The HTTP/1.1 server side of one request: the engine's `Sink`, writing to the client's
transport itself.

Headers are held until the first frames are in hand and go out in one write with them. After
that, frames are written straight to the transport (chunk-framed for an HTTP/1.1 client): no
coroutine, future or buffer object per chunk. The transport's write buffer is the engine's
bounded buffer. `complete` and `close` tell the connection what it may do next.
"""

from __future__ import annotations

import asyncio

from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened
from gateway.errors import Draining, GatewayError, InternalError, RequestTimeout
from gateway.protocols.http.headers import add_rate_limit_headers, client_response_headers
from gateway.protocols.http.request import ParsedRequest
from gateway.protocols.http.response import error_head_and_body, http_date, response_head

_SIZED = 2048
_CHUNK_SIZES = tuple(b"%x\r\n" % size for size in range(_SIZED))
"""Chunk-size lines made once: formatting one costs more than the rest of a small write."""
_LAST_CHUNK = b"0\r\n\r\n"
_NO_BODY = frozenset({204, 304})


class HttpSink:
    __slots__ = (
        "conn", "request", "ctx", "transport", "write", "buffered", "closing", "chunked",
        "started", "complete", "close",
    )
    receive = None  # HTTP/1.1 is one request, one answer: nothing more comes from the client

    def __init__(self, conn, request: ParsedRequest, ctx: RequestContext) -> None:
        self.conn = conn
        """The client's `HttpConnection`: its transport, and a wait for the client to read."""
        self.request = request
        self.ctx = ctx
        self.transport: asyncio.Transport = conn.transport
        self.buffered = self.transport.get_write_buffer_size
        self.closing = self.transport.is_closing
        self.chunked = request.version != "1.0"
        self.started = False
        """Bytes of the answer were written."""
        self.complete = False
        """The whole answer was written: the connection may serve its next request."""
        self.close = not request.keep_alive
        """The connection closes after this answer (also when the gateway drains)."""

    def _closes(self) -> bool:
        """Decided when the head is written: a drain may have begun since the request came."""
        self.close = self.close or self.conn.draining
        return self.close

    def _send(self, data: bytes) -> None:
        if self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.started = True
        self.transport.write(data)

    async def refuse(self, err: GatewayError) -> None:
        # The rest of a body that was not read is not coming, or is garbage: answer, then
        # close at once rather than read a body nobody wants. A gateway draining closes too,
        # so that the client's next request opens a connection to a replica that serves.
        request, ctx = self.request, self.ctx
        if isinstance(err, (RequestTimeout, InternalError, Draining)) or not request.complete:
            self.close = True
        self._closes()
        extra: dict[str, str] = {}
        add_rate_limit_headers(extra, ctx.rate_remaining, ctx.token_budget)
        head_and_body = error_head_and_body(
            err, ctx.request_id, extra.items(), self.close, not self.chunked
        )
        self._send(head_and_body)
        self.complete = True

    async def send_whole(self, opened: Opened) -> None:
        body, length = opened.head, len(opened.head)
        if opened.status in _NO_BODY:  # no Content-Length either (RFC 9110 8.6)
            length = None
        elif self.request.method == "HEAD":  # the length a GET would get, as the upstream said
            body, declared = b"", opened.headers.get("content-length", "")
            length = int(declared) if declared.isdigit() else None
        head = response_head(
            opened.status, self._headers(opened).items(), length=length, close=self._closes(),
            http10=not self.chunked,
        )
        self._send(head + body)
        self.complete = True

    async def commit(self, opened: Opened, first: bytes) -> None:
        chunked = self.chunked
        if not chunked:
            self.close = True  # an HTTP/1.0 client reads the stream to the close
        head = response_head(
            opened.status, self._headers(opened).items(), length=None, close=self._closes(),
            chunked=chunked,
        )
        transport = self.transport
        if chunked:
            send, join, sizes = transport.write, b"".join, _CHUNK_SIZES
            self.write = lambda data: send(
                join((sizes[len(data)], data, b"\r\n"))
                if len(data) < _SIZED
                else b"%x\r\n%b\r\n" % (len(data), data)
            )
            self._send(head + _framed(first) if first else head)
        else:
            self.write = transport.write
            self._send(head + first)

    def _headers(self, opened: Opened):
        sse = opened.headers.get("content-type", "").startswith("text/event-stream")
        headers = client_response_headers(opened.headers, self.ctx.request_id, sse)
        if "date" not in headers:
            headers["Date"] = http_date()
        add_rate_limit_headers(headers, self.ctx.rate_remaining, self.ctx.token_budget)
        return headers

    async def drain(self) -> None:
        """Wait until the client has taken every buffered byte.

        Lowering the transport's high-water mark to zero pauses it at once (when anything is
        buffered); it resumes when its buffer is empty.
        """
        transport = self.transport
        high, low = transport.get_write_buffer_limits()[::-1]
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            await self.conn.writable()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    async def finish(self, tail: bytes) -> None:
        if self.chunked:
            self._send(_framed(tail) + _LAST_CHUNK if tail else _LAST_CHUNK)
        elif tail:
            self._send(tail)
        self.complete = True

    async def fail(self, last_frame: bytes | None) -> None:
        self.close = True
        if last_frame is not None and not self.transport.is_closing():
            await self.finish(last_frame)
        else:
            self.transport.abort()


def _framed(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)
