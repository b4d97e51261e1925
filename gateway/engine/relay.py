"""Relay a committed upstream answer to the client, frame by frame.

Runs after the commit point, so it never retries: a failure can only end the stream, and
always visibly, as the framing says (an SSE `event: error` and a close, never an invented
`[DONE]`; for any other body an aborted connection, so the client sees a cut body).

Backpressure: frames go from the upstream's reads straight to the sink, whose own write buffer
is the bounded buffer between them. When it holds `buffer.chunks` chunks or `buffer.bytes`
bytes, the pump stops reading until the client has drained it, so TCP backpressure reaches the
backend and memory per stream stays bounded. Deadlines are the `StreamClock`'s.
"""

from __future__ import annotations

import asyncio

from gateway.config.routes import Route
from gateway.engine.attempts import Attempts
from gateway.engine.clock import StreamClock
from gateway.engine.context import CLIENT_CLOSED, RequestContext
from gateway.engine.duplex import start_forwarding, stop_forwarding
from gateway.engine.exchange import Opened, Sink
from gateway.errors import GatewayError, UpstreamReset
from gateway.observe import usage
from gateway.observe.metrics import ChunkGapHistogram, Metrics


async def relay(
    sink: Sink,
    ctx: RequestContext,
    opened: Opened,
    route: Route,
    metrics: Metrics,
    tries: Attempts | None = None,
) -> None:
    ctx.status = opened.status
    if opened.status >= 400:
        ctx.outcome = "upstream_error"  # an upstream's error answer, relayed as sent
    if opened.complete:
        ctx.usage = usage.from_body(opened.head)
        await sink.send_whole(opened)
        ctx.first_chunk_at = asyncio.get_running_loop().time()
        ctx.chunks, ctx.bytes = 1, len(opened.head)
        return
    pump = _Pump(sink, ctx, opened, route, metrics)
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
        await stop_forwarding(pump.forwarding)
        opened.finish(clean)


class _Pump:
    """Moves one committed body from the upstream to the sink.

    Only whole frames are written (the framing's `cut`), so an error frame never lands inside
    another. The only await per chunk is the upstream read: writes never wait unless the sink
    holds more than the route's buffer (`_hold_back`), and the clock's phase only changes in
    that slow path.
    """

    __slots__ = (
        "sink", "ctx", "opened", "framing", "route", "clock", "metrics", "gaps", "forwarding",
        "two_way",
    )

    def __init__(
        self, sink: Sink, ctx: RequestContext, opened: Opened, route: Route, metrics: Metrics
    ) -> None:
        self.sink = sink
        self.ctx = ctx
        self.opened = opened
        self.framing = opened.framing
        self.route = route
        self.metrics = metrics
        self.gaps = metrics.chunk_gap.for_route(route.name)
        keepalive = self._keepalive if (self.framing.keepalive and route.keepalive) else None
        self.two_way = opened.response.send is not None and sink.receive is not None
        idle = route.websocket.idle if self.two_way and route.websocket else None
        self.clock = StreamClock(route, ctx.deadline, keepalive, idle)
        self.forwarding: asyncio.Task | None = None
        """A two-way session's client-to-upstream half (`duplex.py`), once committed."""
        ctx.abort = self.clock.fire

    async def run(self) -> None:
        try:
            await self._pump()
        except asyncio.CancelledError:
            reason = self.clock.reason
            if reason is None:
                raise  # the client went away: the protocol cancelled the handler
            asyncio.current_task().uncancel()
            raise reason from None
        except (ConnectionResetError, GatewayError):
            raise  # writing to a client that is gone; or a verdict already made
        except Exception as exc:  # the upstream side broke mid-body
            raise UpstreamReset(
                f"upstream {self.ctx.upstream!r} broke off the stream: {exc}"
            ) from exc

    async def _pump(self) -> None:
        ctx, clock, sink, framing = self.ctx, self.clock, self.sink, self.framing
        cut = framing.cut
        read = self.opened.response.read
        time = clock._loop.time
        gaps, observe_gap = self.gaps, ChunkGapHistogram.observe
        watch_usage = framing.watches_usage
        usage_frames = b""
        head = self.opened.head
        end = cut(head)
        data, tail = head[:end], head[end:]
        await sink.commit(self.opened, data)
        ctx.first_chunk_at = time()
        if self.two_way:
            self.forwarding = start_forwarding(sink, self.opened.response, clock, ctx)
        write, closing, buffered = sink.write, sink.closing, sink.buffered
        ctx.chunks, ctx.bytes = framing.frames, len(data)
        if watch_usage and b'"usage"' in data:
            usage_frames = data
        arrived = clock.since = time()
        try:
            while data := await read():
                now = time()
                observe_gap(gaps, now - arrived)
                arrived = clock.since = now
                clock.asked = False  # a session's pending client message has its answer
                if tail:
                    data = tail + data
                end = cut(data)
                if end < len(data):
                    if not end:
                        tail = data
                        continue
                    data, tail = data[:end], data[end:]
                else:
                    tail = b""
                if closing():
                    raise ConnectionResetError("the client went away")
                write(data)
                ctx.chunks += framing.frames
                ctx.bytes += len(data)
                if watch_usage and b'"usage"' in data:
                    usage_frames = data
                if buffered():
                    await self._hold_back()
                elif ctx.buffered_chunks:
                    ctx.buffered_chunks = 0
        finally:
            # On every exit (a cut stream, a client gone) so token budgets settle to the
            # usage seen so far; parsed once here, not per chunk.
            if usage_frames:
                ctx.usage = framing.usage(usage_frames)
        truncated = framing.ended(tail)
        if truncated is not None:
            raise truncated
        await sink.finish(tail)  # an SSE tail is relayed as sent: nothing is invented
        ctx.bytes += len(tail)

    async def _hold_back(self) -> None:
        """The sink has bytes waiting: count the chunk, and past the route's buffer stop
        reading from the upstream until the client has drained it all."""
        ctx, buffer = self.ctx, self.route.buffer
        ctx.buffered_chunks += 1
        if ctx.buffered_chunks < buffer.chunks and self.sink.buffered() < buffer.bytes:
            return
        self.metrics.backpressure_stalls.labels(self.route.name).inc()
        clock = self.clock
        clock.reading, clock.since = False, clock._loop.time()  # slow_client applies
        await self.sink.drain()
        clock.reading, clock.since = True, clock._loop.time()
        ctx.buffered_chunks = 0

    def _keepalive(self) -> None:
        if not self.sink.closing():
            self.sink.write(self.framing.keepalive)

    async def end_visibly(self, err: GatewayError) -> None:
        """After the commit point: the framing's error frame and a close, or an abort."""
        self.ctx.outcome = err.outcome
        self.ctx.error_kind = err.condition
        await self.sink.fail(self.framing.error_frame(err, self.ctx.request_id))
