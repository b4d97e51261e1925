"""Relay a committed upstream response to the client, chunk by chunk.

Runs after the commit point, so it never retries: a failure can only end the stream, and
always visibly. An SSE stream gets an `event: error` and a close (never an invented
`[DONE]`); any other body is cut off by aborting the connection, so the client sees an
incomplete body rather than a clean end.

Backpressure: chunks go from the upstream reader straight to the client's transport, and its
write buffer is the bounded buffer between them. When it holds `buffer.chunks` chunks or
`buffer.bytes` bytes, the pump stops reading until the client has drained it, so TCP
backpressure reaches the backend and memory per stream stays bounded.

Deadlines (`chunk_gap`, `slow_client`, `total`, `keepalive`) are kept by one `StreamClock`
timer per stream, not a timeout object per await: the pump only stores the time each chunk
arrives, and the timer wakes at the earliest deadline to re-arm or to end the stream.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from . import sse, usage
from .attempt import Opened
from .config import Route
from .context import RequestContext
from .errors import GatewayError, SlowClient, UpstreamReset, UpstreamTimeout, sse_error_event
from .headers import add_rate_limit_headers, client_response_headers
from .metrics import ChunkGapHistogram, Metrics

KEEPALIVE_COMMENT = b": keepalive\n\n"
CLIENT_CLOSED = 499


class StreamClock:
    """The deadlines of one committed stream, kept by a single lazily re-armed timer."""

    __slots__ = (
        "reading",
        "since",
        "reason",
        "_loop",
        "_task",
        "_handle",
        "_chunk_gap",
        "_slow_client",
        "_deadline",
        "_keepalive",
        "_keepalive_after",
        "_send_keepalive",
    )

    def __init__(self, route: Route, deadline: float, send_keepalive=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self.reading = True
        """True while waiting on the upstream (chunk_gap applies), False while writing
        to the client (slow_client applies)."""
        self.since = self._loop.time()
        """When the current phase began."""
        self.reason: GatewayError | None = None
        self._chunk_gap = route.timeouts.chunk_gap
        self._slow_client = route.timeouts.slow_client
        self._deadline = deadline
        self._keepalive = route.keepalive if send_keepalive is not None else None
        self._keepalive_after = self.since
        self._send_keepalive = send_keepalive
        self._handle = None
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self) -> None:
        # The phase may change while the timer sleeps, to one with a shorter limit; waking at
        # least every min(limit) catches that in time, because a phase that began after this
        # arm began after `now`.
        limit = self._chunk_gap if self.reading else self._slow_client
        now = self._loop.time()
        due = min(self.since + limit, now + min(self._chunk_gap, self._slow_client), self._deadline)
        if self._keepalive is not None and self.reading:
            due = min(due, max(self.since, self._keepalive_after) + self._keepalive)
        self._handle = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._deadline:
            return self.fire(UpstreamTimeout("the stream ran out of total time", "total_timeout"))
        if self.reading and now - self.since >= self._chunk_gap:
            silence = f"{now - self.since:.1f}s"
            return self.fire(UpstreamTimeout(f"upstream silent for {silence}", "chunk_gap_timeout"))
        if not self.reading and now - self.since >= self._slow_client:
            return self.fire(SlowClient("the client stopped reading"))
        if (
            self._keepalive is not None
            and self.reading
            and now - max(self.since, self._keepalive_after) >= self._keepalive
        ):
            self._keepalive_after = now  # keepalives do not reset chunk_gap
            self._send_keepalive()
        self._arm()

    def fire(self, reason: GatewayError) -> None:
        """End the stream now with `reason` (the timer's deadlines, or draining at shutdown)."""
        self.stop()
        if self.reason is None and self._task is not None:
            self.reason = reason
            self._task.cancel()


async def relay(
    request: web.BaseRequest, ctx: RequestContext, opened: Opened, route: Route, metrics: Metrics
) -> web.StreamResponse:
    headers = client_response_headers(opened.headers, ctx.request_id, opened.sse)
    add_rate_limit_headers(headers, ctx.rate_remaining)
    ctx.status = opened.status
    if opened.status >= 400:
        ctx.outcome = "upstream_error"  # an upstream's error answer, relayed as sent
    if opened.complete:
        ctx.usage = usage.from_body(opened.head)
        return await _send_whole(request, ctx, opened, headers)
    response = web.StreamResponse(status=opened.status, headers=headers)
    # The commit point. Headers stay buffered until the first chunk, and go out with it.
    response._send_headers_immediately = False
    await response.prepare(request)
    ctx.first_chunk_at = asyncio.get_running_loop().time()
    pump = _Pump(request, ctx, opened, route, response, metrics)
    clean = False
    try:
        await pump.run()
        clean = True
    except GatewayError as err:
        await pump.end_visibly(err)
    except ConnectionResetError:  # the client went away while we wrote to it
        ctx.status, ctx.outcome = CLIENT_CLOSED, "client_disconnect"
    finally:
        pump.clock.stop()
        opened.finish(clean)
    return response


async def _send_whole(
    request: web.BaseRequest, ctx: RequestContext, opened: Opened, headers
) -> web.StreamResponse:
    response = web.Response(status=opened.status, headers=headers, body=opened.head)
    await response.prepare(request)
    await response.write_eof()
    ctx.first_chunk_at = asyncio.get_running_loop().time()
    ctx.chunks, ctx.bytes = 1, len(opened.head)
    return response


class _Pump:
    """Moves one committed body from the upstream to the client.

    The first write goes through aiohttp's writer, which sends it in one piece with the
    buffered status line and headers. After that, each chunk is framed here and written
    straight to the client's transport: no coroutine per chunk, and no wait unless the
    transport holds more than the route's buffer (`_hold_back`). So the only await per chunk
    is the upstream read, and the clock's phase only changes in the slow path.
    """

    __slots__ = (
        "request",
        "ctx",
        "opened",
        "route",
        "response",
        "clock",
        "metrics",
        "gaps",
        "usage_event",
        "transport",
        "_keepalive_task",
    )

    def __init__(
        self,
        request: web.BaseRequest,
        ctx: RequestContext,
        opened: Opened,
        route: Route,
        response: web.StreamResponse,
        metrics: Metrics,
    ) -> None:
        self.request = request
        self.metrics = metrics
        self.gaps = metrics.chunk_gap.for_route(route.name)
        self.usage_event = b""
        """The last bytes written that mention "usage" (an OpenAI usage chunk)."""
        self.ctx = ctx
        self.opened = opened
        self.route = route
        self.response = response
        self.transport = request.transport
        self._keepalive_task: asyncio.Task | None = None
        keepalive = self._keepalive if (opened.sse and route.keepalive) else None
        self.clock = StreamClock(route, ctx.deadline, keepalive)
        ctx.abort = self.clock.fire

    async def run(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        try:
            if self.opened.sse:
                await self._pump_events()
            else:
                await self._pump_bytes()
        except asyncio.CancelledError:
            reason = self.clock.reason
            if reason is None:
                raise  # the client went away: aiohttp cancelled the handler
            asyncio.current_task().uncancel()
            raise reason from None
        except ConnectionResetError:
            raise  # writing to a client that is gone
        except Exception as exc:  # the upstream side broke mid-body
            if isinstance(exc, GatewayError):
                raise
            raise UpstreamReset(
                f"upstream {self.ctx.upstream!r} broke off the stream: {exc}"
            ) from exc
        await self.response.write_eof()

    async def _write_first(self, data: bytes) -> None:
        writer = self.response._payload_writer  # aiohttp has no public "flush headers with"
        if data:
            await writer.write(data, drain=False)
        else:
            writer.send_headers()

    async def _pump_bytes(self) -> None:
        ctx, clock, transport = self.ctx, self.clock, self.transport
        write, is_closing = transport.write, transport.is_closing
        buffered = transport.get_write_buffer_size
        chunked = self.response._payload_writer.chunked  # set by prepare() for HTTP/1.1
        read = self.opened.response.content.readany
        time = clock._loop.time
        gaps, observe_gap = self.gaps, ChunkGapHistogram.observe
        data = self.opened.head
        await self._write_first(data)
        ctx.chunks, ctx.bytes = 1, len(data)
        arrived = clock.since = time()
        while data := await read():
            now = time()
            observe_gap(gaps, now - arrived)
            arrived = clock.since = now
            if is_closing():
                raise ConnectionResetError("the client went away")
            write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            ctx.chunks += 1
            ctx.bytes += len(data)
            if buffered():
                await self._hold_back()
            elif ctx.buffered_chunks:
                ctx.buffered_chunks = 0

    async def _pump_events(self) -> None:
        """Like _pump_bytes, but only whole events are written: a partial event is held
        until it completes, so an error event never lands inside another event."""
        ctx, clock, transport = self.ctx, self.clock, self.transport
        write, is_closing = transport.write, transport.is_closing
        buffered = transport.get_write_buffer_size
        chunked = self.response._payload_writer.chunked  # set by prepare() for HTTP/1.1
        read = self.opened.response.content.readany
        time = clock._loop.time
        gaps, observe_gap = self.gaps, ChunkGapHistogram.observe
        sep = sse.separator_of(self.opened.head)
        data, tail = sse.split_complete(self.opened.head, sep)
        await self._write_first(data)
        ctx.chunks, ctx.bytes = data.count(sep), len(data)
        if b'"usage"' in data:
            self.usage_event = data
        arrived = clock.since = time()
        while data := await read():
            now = time()
            observe_gap(gaps, now - arrived)
            arrived = clock.since = now
            if tail:
                data = tail + data
            cut = data.rfind(sep)
            if cut < 0:
                tail = data
                continue
            end = cut + len(sep)
            if end < len(data):
                data, tail = data[:end], data[end:]
            else:
                tail = b""
            if is_closing():
                raise ConnectionResetError("the client went away")
            write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
            ctx.chunks += data.count(sep)
            ctx.bytes += len(data)
            if b'"usage"' in data:
                self.usage_event = data
            if buffered():
                await self._hold_back()
            elif ctx.buffered_chunks:
                ctx.buffered_chunks = 0
        if self.usage_event:
            ctx.usage = usage.from_sse(self.usage_event, sep)
        if tail:  # the upstream ended inside an event: relayed as sent, nothing invented
            await self.response.write(tail)
            ctx.bytes += len(tail)

    async def _hold_back(self) -> None:
        """The client's transport has bytes waiting: count the chunk, and past the route's
        buffer stop reading from the upstream until the client has drained it all."""
        ctx, buffer = self.ctx, self.route.buffer
        ctx.buffered_chunks += 1
        pending = self.transport.get_write_buffer_size()
        if ctx.buffered_chunks < buffer.chunks and pending < buffer.bytes:
            return
        self.metrics.backpressure_stalls.labels(self.route.name).inc()
        clock = self.clock
        clock.reading, clock.since = False, clock._loop.time()  # slow_client applies
        await _drained(self.response, self.transport)
        clock.reading, clock.since = True, clock._loop.time()
        ctx.buffered_chunks = 0

    def _keepalive(self) -> None:
        if self._keepalive_task is None or self._keepalive_task.done():
            self._keepalive_task = asyncio.ensure_future(self.response.write(KEEPALIVE_COMMENT))
            self._keepalive_task.add_done_callback(_ignore_result)

    async def end_visibly(self, err: GatewayError) -> None:
        """After the commit point: an SSE error event and a close, or an aborted connection."""
        self.ctx.outcome = err.outcome
        self.ctx.error_kind = err.condition
        transport = self.request.transport
        if self.opened.sse and transport is not None and not transport.is_closing():
            self.response.force_close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await self.response.write(sse_error_event(err, self.ctx.request_id))
                await self.response.write_eof()
        elif transport is not None:
            transport.abort()


async def _drained(response: web.StreamResponse, transport: asyncio.Transport) -> None:
    """Wait until the client has taken every buffered byte.

    Lowering the transport's high-water mark to zero pauses it at once; aiohttp's drain then
    waits for the transport to resume, which it does when its buffer is empty.
    """
    high, low = transport.get_write_buffer_limits()[::-1]
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        await response._payload_writer.drain()  # no public drain that does not warn
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)


def _ignore_result(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
