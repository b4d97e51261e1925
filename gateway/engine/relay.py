"""Relay a committed upstream answer to the client, frame by frame.

Runs after the commit point, so it never retries: a failure can only end the stream, and
always visibly, as the framing says (an SSE `event: error` and a close, never an invented
`[DONE]`; for any other body an aborted connection, so the client sees a cut body).

Backpressure: frames go from the upstream's reads straight to the sink, whose own write buffer
is the bounded buffer between them. When it holds `buffer.chunks` chunks or `buffer.bytes`
bytes, the pump stops reading until the client has drained it, so TCP backpressure reaches the
backend and memory per stream stays bounded. Deadlines are the `StreamClock`'s. A stream a
token budget watches (`token_watch.py`) has its frames filtered and counted before each write.
"""

from __future__ import annotations

import asyncio

from gateway.config.routes import Route
from gateway.engine.attempts import Attempts
from gateway.engine.chunk_step import USAGE_KEY, feeder
from gateway.engine.clock import StreamClock
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened, Sink
from gateway.engine.resume import Resumer
from gateway.engine.token_watch import hide_in_whole_answer, token_watch
from gateway.errors import GatewayError, UpstreamReset
from gateway.observe import usage
from gateway.observe.metrics import Metrics


async def relay(
    sink: Sink,
    ctx: RequestContext,
    opened: Opened,
    route: Route,
    metrics: Metrics,
    tries: Attempts | None = None,
) -> None:
    """Relay `opened` to the client; `tries` (the request's attempt loop) lets a route with
    `resume:` continue a broken stream (resume.py)."""
    ctx.status = opened.status
    if opened.status >= 400:
        ctx.outcome = "upstream_error"  # an upstream's error answer, relayed as sent
    if opened.complete:
        if ctx.hide_usage:
            hide_in_whole_answer(ctx, opened, route)
        else:
            ctx.usage = usage.from_body(opened.head)
        await sink.send_whole(opened)
        ctx.first_chunk_at = ctx.loop.time()
        ctx.chunks, ctx.bytes = 1, len(opened.head)
        return
    resumer = Resumer.start(ctx, route, opened, tries, metrics)
    if resumer is None:  # nothing will be asked again: a long stream does not keep its request
        ctx.body, ctx.json = b"", None
    pump = _Pump(sink, ctx, opened, route, metrics, resumer)
    clean = False
    try:
        await pump.run()
        clean = True
    except GatewayError as err:
        await pump.let_go(clean=False)  # the upstream stops now, however slow the client is
        await pump.end_visibly(err)
    except ConnectionResetError:  # the client went away while we wrote to it
        ctx.client_gone()
    finally:
        await pump.let_go(clean)


class _Pump:
    """Moves one committed body from the upstream to the sink.

    Only whole frames are written (the framing's `cut`), so an error frame never lands inside
    another. Each batch of body bytes goes through one synchronous step (`chunk_step.py`),
    pushed by the upstream's protocol where it can (`UpstreamResponse.stream`: no await per
    chunk at all), else pulled with one await per read. Writes never wait unless the sink
    holds more than the route's buffer (`_hold_back`), and the clock's phase only changes in
    that slow path. With a resumer, each batch of whole frames also passes through it.
    """

    __slots__ = (
        "sink", "ctx", "opened", "framing", "route", "clock", "metrics", "gaps", "two_way",
        "watch", "resumer", "committed", "tail", "usage_frames",
    )

    def __init__(
        self,
        sink: Sink,
        ctx: RequestContext,
        opened: Opened,
        route: Route,
        metrics: Metrics,
        resumer: Resumer | None = None,
    ) -> None:
        self.sink = sink
        self.ctx = ctx
        self.opened = opened
        """The upstream answer being relayed: a continuation once a resume took over."""
        self.framing = opened.framing
        """The client stream's framing (its error frame, its keepalive)."""
        self.route = route
        self.metrics = metrics
        self.gaps = metrics.chunk_gap.labels(route.name)
        keepalive = self._keepalive if (self.framing.keepalive and route.keepalive) else None
        self.two_way = opened.response.send is not None and ctx.session is not None
        idle = route.websocket.idle if self.two_way and route.websocket else None
        self.clock = StreamClock(route, ctx.deadline, ctx.loop, keepalive, idle)
        self.resumer = resumer
        self.committed = False
        ctx.abort = self.clock.fire
        self.watch = token_watch(ctx, self.framing)
        """Hides asked-for usage and enforces a token cap; None for most streams."""
        self.tail = b""
        """Bytes after the last whole frame, held until their frame is whole."""
        self.usage_frames = b""
        """The current answer's last frames that mentioned `usage`."""

    async def run(self) -> None:
        while True:
            try:
                tail = await self._pump()
            except asyncio.CancelledError:
                reason = self.clock.reason
                if reason is None:
                    raise  # the client went away: the protocol cancelled the handler
                asyncio.current_task().uncancel()
                err = reason
            except ConnectionResetError:
                raise  # writing to a client that is gone
            except GatewayError as verdict:
                err = verdict
            except Exception as exc:  # the upstream side broke mid-body
                err = UpstreamReset(f"upstream {self.ctx.upstream!r} broke off the stream: {exc}")
            else:  # the body ended: whole, or cut before its finish (resumable)
                if await self._resumed("cut"):
                    continue
                return await self._finish(tail)
            if not await self._resumed(err.condition):
                raise err

    async def _resumed(self, condition: str) -> bool:
        """Whether another try took over the broken stream (resume.py)."""
        resumer, clock = self.resumer, self.clock
        if resumer is None or not resumer.can_resume(condition):
            return False
        clock.pause()  # the continuation's first chunk has its own bound
        self.opened.finish(clean=False)  # closed before another backend is asked
        try:
            opened = await resumer.resume(condition, self.opened)
        except asyncio.CancelledError:
            reason = clock.reason
            if reason is None:
                raise
            asyncio.current_task().uncancel()
            raise reason from None  # shutdown while asking
        if opened is None:
            return False
        self.opened = opened
        if self.watch is not None:
            self.watch.framing = opened.framing  # it counts the continuation's frames
        clock.restart()
        return True

    async def _pump(self) -> bytes:
        """Relay the current upstream answer to its end; the bytes after its last frame."""
        ctx, clock, sink, opened = self.ctx, self.clock, self.sink, self.opened
        framing, response = opened.framing, opened.response
        noted = self.resumer.watch if self.resumer is not None else None
        watch = self.watch
        head, opened.head = opened.head, b""  # not kept for the stream's life
        end = framing.cut(head)
        data, self.tail = head[:end], head[end:]
        self.usage_frames = b""
        if noted is not None:
            data = noted(data)
        if framing.watches_usage and data.partition(USAGE_KEY)[1]:
            self.usage_frames = data  # as the upstream sent them, for settlement
        continuing = self.committed  # a continuation (resume.py) after a break
        if not continuing:
            if watch is not None:
                data = watch.first(data)
            await sink.commit(opened, data)  # the sink's write exists from here on
            self.committed = True
            ctx.first_chunk_at = clock._loop.time()
            if self.two_way:
                ctx.session.commit(clock.ask)  # the client's messages: no more replays
            ctx.chunks, ctx.bytes = framing.frames, len(data)
        if continuing and watch is not None and data:
            data = watch(data)
        if continuing and data:
            if sink.closing():
                raise ConnectionResetError("the client went away")
            sink.write(data)
            ctx.chunks += framing.frames
            ctx.bytes += len(data)
        clock.answering = framing.answering
        clock.since = clock._loop.time()
        feed = feeder(self, framing, noted)
        try:
            if response is not None and response.stream is not None:  # pushed: no await per chunk
                while not await response.stream(feed):
                    await self._hold_back()
            else:
                read = response.read if response is not None else _ended
                while data := await read():
                    clock.asked = False  # a session's pending client message has its answer
                    if feed(data):
                        await self._hold_back()
        finally:
            # On every exit (a cut stream, a client gone) so token budgets settle to the
            # usage seen so far; parsed once here, not per chunk.
            if self.usage_frames:
                ctx.usage = self.framing.usage(self.usage_frames)
        truncated = framing.ended(self.tail)
        if truncated is not None:
            raise truncated
        return self.tail

    async def _finish(self, tail: bytes) -> None:
        await self.sink.finish(tail)  # an SSE tail is relayed as sent: nothing is invented
        self.ctx.bytes += len(tail)

    async def _hold_back(self) -> None:
        """The sink holds more than the route's buffer: stop reading from the upstream until
        the client has drained it all."""
        self.metrics.backpressure_stalls.labels(self.route.name).inc()
        ctx, clock = self.ctx, self.clock
        clock.reading, clock.since = False, clock._loop.time()  # slow_client applies
        await self.sink.drain()
        clock.reading, clock.since = True, clock._loop.time()
        ctx.buffered_chunks = 0

    async def let_go(self, clean: bool) -> None:
        """Stop the clock and let go of the upstream (once; the client's half of a session
        first, so nothing more is sent to it)."""
        self.clock.stop()
        if self.two_way:
            await self.ctx.session.stop()
        self.opened.finish(clean)

    def _keepalive(self) -> None:
        if not self.sink.closing():
            self.sink.write(self.framing.keepalive)

    async def end_visibly(self, err: GatewayError) -> None:
        """After the commit point: the framing's error frame and a close, or an abort."""
        self.ctx.outcome = err.outcome
        self.ctx.error_kind = err.condition
        await self.sink.fail(self.framing.error_frame(err, self.ctx.request_id))


async def _ended() -> bytes:
    """The read of an answer that was whole before it was relayed."""
    return b""
