"""The client-to-upstream half of a two-way exchange (a WebSocket session).

The relay (`relay.py`) carries the upstream's messages to the client, with its clock and its
bounded buffer; this carries the client's messages the other way, for as long as the session
lasts, and is stopped by the relay however the session ends. Backpressure this way is the
upstream connection's: `send` waits while it is backed up, and meanwhile nothing is read from
the client, so TCP pushes back on it. The client's close is forwarded, so the upstream sees it
at once; the upstream then ends its side and the relay ends cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.engine import messages
from gateway.engine.clock import StreamClock
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Sink, UpstreamResponse


def start_forwarding(
    sink: Sink, response: UpstreamResponse, clock: StreamClock, ctx: RequestContext
) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(_forward(sink, response, clock, ctx))


async def stop_forwarding(task: asyncio.Task | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # its failure, if any, is the session's end, already being reported


async def _forward(
    sink: Sink, response: UpstreamResponse, clock: StreamClock, ctx: RequestContext
) -> None:
    receive, send = sink.receive, response.send
    while message := await receive():
        if message[0] == messages.CLOSE:
            ctx.client_closed = messages.close_of(message[messages.HEAD_SIZE :])
            await send(message)  # the upstream closes too, and the relay then ends
            return
        clock.ask()
        ctx.messages_in += 1
        await send(message)
