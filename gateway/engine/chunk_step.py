"""The relay's per-chunk step: what happens to each batch of body bytes once committed.

Count the gap since the last batch, cut whole frames (the rest waits in the pump's `tail`),
pass them through the resumer and the token watch where a stream has them, write them to the
sink, count them, and say whether the sink holds more than the route's buffer. It runs once
per read, and, where the upstream's protocol pushes (`UpstreamResponse.stream`), from that
protocol's receive callback with no await at all; so everything here is paid per chunk: the
closure looks up every bound method once, and searches bytes with `partition` (`needle in
data` on bytes first tries the needle as an integer and raises and clears a TypeError inside,
several times the cost of the search).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable

from gateway.engine.framing import Framing

USAGE_KEY = b'"usage"'
"""Frames that mention it may carry an OpenAI `usage` object (token counts)."""


def feeder(pump, framing: Framing, noted) -> Callable[[bytes], bool]:
    """`pump`'s per-chunk step for an answer in `framing`, as one closure over what it needs;
    `noted` is the resumer's watch, if any. True when the sink holds more than the route's
    buffer, so reading must stop until the client has drained it (the pump's `_hold_back`)."""
    ctx, clock, watch = pump.ctx, pump.clock, pump.watch
    cut, time = framing.cut, clock._loop.time
    write, closing, buffered = pump.sink.write, pump.sink.closing, pump.sink.buffered
    gaps, bounds = pump.gaps, pump.gaps.bounds
    watch_usage = framing.watches_usage
    max_chunks, max_bytes = pump.route.buffer.chunks, pump.route.buffer.bytes
    arrived = clock.since

    def feed(data: bytes) -> bool:
        nonlocal arrived
        now = time()
        gap = now - arrived
        gaps[bisect_left(bounds, gap)] += 1  # Buckets.observe, inline
        gaps[-1] += gap
        arrived = clock.since = now
        tail = pump.tail
        if tail:
            data = tail + data
        end = cut(data)
        if end < len(data):
            pump.tail = data[end:]
            if not end:
                return False
            data = data[:end]
        elif tail:
            pump.tail = b""
        clock.answering = framing.answering
        if noted is not None and not (data := noted(data)):
            return False
        if closing():
            raise ConnectionResetError("the client went away")
        if watch_usage and data.partition(USAGE_KEY)[1]:
            pump.usage_frames = data
        if watch is not None and not (data := watch(data)):
            return False  # nothing left to relay: the usage-only event the gateway asked for
        write(data)
        ctx.chunks += framing.frames
        ctx.bytes += len(data)
        if buffered():
            ctx.buffered_chunks += 1
            return ctx.buffered_chunks >= max_chunks or buffered() >= max_bytes
        if ctx.buffered_chunks:
            ctx.buffered_chunks = 0
        return False

    return feed
