"""The client side of one gRPC call: the engine's `Sink` over a grpc.aio servicer context.

Initial metadata is held until the first message is in hand and goes out with it. grpc.aio
writes a message with an await, and the engine's `write` never waits, so messages wait in a
queue that one writer task empties in order: the queue is the engine's bounded buffer
(`buffered`, `drain`), and while the client's HTTP/2 window is shut it fills, the relay stops
reading, and flow control reaches the upstream. The call ends with the upstream's status,
message and trailing metadata as sent (`finish`); a failure after the first message ends it
with the framing's status, never OK (`fail`); a refusal before it, with the status its HTTP
status corresponds to (`refuse`).
"""

from __future__ import annotations

import asyncio
from collections import deque

import grpc
from grpc import aio

from gateway.engine import messages
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened
from gateway.errors import GatewayError
from gateway.protocols.grpc import wire
from gateway.protocols.grpc.metadata import to_client
from gateway.protocols.grpc.status import BY_CODE, code_of, http_status, refusal_code

_FLUSH_BOUND_S = 1.0
"""How long a failing call waits for its client to take the messages before its status."""
_OK, _INTERNAL = 0, grpc.StatusCode.INTERNAL.value[0]


class GrpcSink:
    __slots__ = (
        "context",
        "ctx",
        "_queue",
        "_queued",
        "_final",
        "_writer",
        "_wake",
        "_empty",
        "_gone",
    )
    receive = None  # the request messages were read whole before routing

    def __init__(self, context: aio.ServicerContext, ctx: RequestContext) -> None:
        self.context = context
        self.ctx = ctx
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._final: tuple[int, str, wire.Metadata] | None = None
        """The status the call ends with, once a trailers frame came."""
        self._writer: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._gone = False

    # ------------------------------------------------------------- before the commit point

    async def refuse(self, err: GatewayError) -> None:
        trailing = list(self._extras())
        if err.retry_after is not None:  # gRPC's standard retry pushback
            trailing.append(("grpc-retry-pushback-ms", str(int(err.retry_after * 1000))))
        self._end(code_of(refusal_code(err)), f"{err.type}: {err.message}", tuple(trailing))

    async def send_whole(self, opened: Opened) -> None:
        """A complete answer: its messages (if any) and its status, as the upstream sent them."""
        final, sent = (_code_for_status(opened.status), "", ()), []
        for kind, payload in messages.split(opened.head):
            if kind == wire.DATA:
                sent.append(payload)
            else:
                final = wire.read_trailers(payload)
        if sent:
            await self.context.send_initial_metadata(self._client_metadata(opened.headers))
            for message in sent:
                await self.context.write(message)
        self._final = final
        self._end_with_final()

    # ------------------------------------------------------------- the commit point and after

    async def commit(self, opened: Opened, first: bytes) -> None:
        context = self.context
        if context.cancelled() or context.done():
            raise ConnectionResetError("the client went away")
        await context.send_initial_metadata(self._client_metadata(opened.headers))
        self._writer = asyncio.get_running_loop().create_task(self._write_all())
        if first:
            self.write(first)

    def write(self, data: bytes) -> None:
        queue = self._queue
        for kind, payload in messages.split(data):
            if kind == wire.DATA:
                queue.append(payload)
                self._queued += len(payload)
            else:
                self._final = wire.read_trailers(payload)
        if queue:
            self._empty.clear()
            self._wake.set()

    def buffered(self) -> int:
        return self._queued

    def closing(self) -> bool:
        return self._gone

    async def _write_all(self) -> None:
        queue, write = self._queue, self.context.write
        try:
            while True:
                while queue:
                    message = queue[0]
                    await write(message)
                    queue.popleft()
                    self._queued -= len(message)
                self._empty.set()
                self._wake.clear()
                await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception:  # the call is over on the client's side
            self._gone = True
            self._empty.set()

    async def drain(self) -> None:
        await self._empty.wait()

    async def finish(self, tail: bytes) -> None:
        await self._empty.wait()
        self._stop_writer()
        self._end_with_final()

    async def fail(self, last_frame: bytes | None) -> None:
        if last_frame is None:  # no frame to end with: a bug of ours (see pipeline)
            self._final = (_INTERNAL, "internal error in the gateway", ())
        else:
            self.write(last_frame)
        if self._writer is not None:
            try:
                async with asyncio.timeout(_FLUSH_BOUND_S):
                    await self._empty.wait()
            except TimeoutError:
                pass  # a client that takes nothing: its status goes out all the same
        self._stop_writer()
        code, details, trailing = self._final
        self._end(code, details, to_client(trailing, self.ctx.request_id))

    # ------------------------------------------------------------- the end

    def _end_with_final(self) -> None:
        """End with the upstream's own status; one that is not OK is counted as its error."""
        code, details, trailing = self._final or (_OK, "", ())
        if code != _OK and self.ctx.status < 400:
            self.ctx.status, self.ctx.outcome = http_status(code), "upstream_error"
        self._end(code, details, to_client(trailing, self.ctx.request_id))

    def _end(self, code: int, details: str, trailing: wire.Metadata) -> None:
        context = self.context
        context.set_trailing_metadata(trailing)
        if code != _OK:
            context.set_code(BY_CODE.get(code, grpc.StatusCode.UNKNOWN))
            context.set_details(details)

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None

    def _client_metadata(self, headers) -> wire.Metadata:
        return (*to_client(headers, self.ctx.request_id), *self._extras()[1:])

    def _extras(self) -> tuple[tuple[str, str], ...]:
        """x-request-id, and the x-ratelimit-* entries where a rate limit applied."""
        ctx = self.ctx
        extras = [("x-request-id", ctx.request_id)]
        if ctx.rate_remaining is not None:
            extras.append(("x-ratelimit-limit", str(ctx.rate_remaining[0])))
            extras.append(("x-ratelimit-remaining", str(ctx.rate_remaining[1])))
        return tuple(extras)


def _code_for_status(status: int) -> int:
    """A whole answer without a trailers frame (none of ours lacks one): judged by status."""
    return _OK if status < 400 else grpc.StatusCode.UNKNOWN.value[0]
