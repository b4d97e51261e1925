"""The client-to-upstream half of a two-way exchange (a WebSocket session), across its tries.

The relay (`relay.py`) carries the upstream's messages to the client, with its clock and its
bounded buffer; this carries the client's messages the other way, for as long as the session
lasts. It is made once per session and outlives the tries:

- A try whose upstream accepted the session `attach`es it. The first connects the client
  (`Sink.open`), so that it can ask; every try gets the messages the client sent so far,
  replayed in order, then each new one as it comes. Until the first upstream message has
  reached the client (the commit point) a try can still fail (a reset, or silence past
  `first_chunk` once asked) and the next one gets the same messages, so the client sees one
  upstream answer its questions. Those messages are kept up to the route's
  `websocket.replay_buffer` bytes; when that is full the client is not read until the
  commit point (its messages wait in TCP, nothing is dropped).
- Once committed, nothing is kept: each message goes to the one upstream, and the clock is told
  (`first_chunk` from a client message to the upstream's answer). Backpressure this way is
  the upstream connection's: `send` waits while it is backed up, and meanwhile nothing is read
  from the client, so TCP pushes back on it.

The client's close is forwarded, so the upstream sees it at once; the upstream then ends its
side and the relay ends cleanly. The relay (or, before the commit point, the pipeline) stops
this half on every exit path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from gateway.engine import messages
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Sink, UpstreamResponse


class ClientHalf:
    """One session's client-to-upstream half (see the module's docstring)."""

    __slots__ = (
        "sink",
        "ctx",
        "asked",
        "_limit",
        "_kept",
        "_kept_bytes",
        "_target",
        "_on_ask",
        "_lock",
        "_room",
        "_task",
        "_client_closed",
    )

    def __init__(self, sink: Sink, ctx: RequestContext, replay_limit: int) -> None:
        self.sink, self.ctx = sink, ctx
        self.asked = False
        """The current try's upstream has been sent a client message."""
        self._limit = replay_limit
        self._kept: list[bytes] | None = []
        """The client's messages so far, replayed to each try; None once committed."""
        self._kept_bytes = 0
        self._target: UpstreamResponse | None = None
        self._on_ask: Callable[[], None] | None = None
        self._lock = asyncio.Lock()  # a message goes to each upstream once, in order
        self._room = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._client_closed = False

    async def attach(
        self, response: UpstreamResponse, headers: Mapping[str, str], on_ask: Callable[[], None]
    ) -> None:
        """A try's upstream accepted the session (`headers`: its acceptance): connect the
        client on the first, and send this upstream every client message so far. `on_ask` is
        called whenever a client message has been sent to it."""
        if self._client_closed:
            raise asyncio.CancelledError  # the client left before any upstream answered
        await self.sink.open(headers)
        async with self._lock:
            self._target, self._on_ask, self.asked = response, on_ask, False
            for message in self._kept:
                await response.send(message)
            if self._kept:
                self._ask()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._forward())

    def detach(self) -> None:
        """The try failed: its upstream gets nothing more."""
        self._target = self._on_ask = None

    def commit(self, on_ask: Callable[[], None]) -> None:
        """The first upstream message reached the client: nothing is replayed any more."""
        self._kept, self._kept_bytes, self._on_ask = None, 0, on_ask
        self._room.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task  # its failure, if any, is the session's end, already being reported

    async def _forward(self) -> None:
        receive, ctx = self.sink.receive, self.ctx
        while message := await receive():
            closing = message[0] == messages.CLOSE
            if closing:
                ctx.client_closed = messages.close_of(message[messages.HEAD_SIZE :])
                self._client_closed = True
            else:
                ctx.messages_in += 1
            async with self._lock:
                kept = self._kept
                if kept is not None and not closing:
                    kept.append(message)
                    self._kept_bytes += len(message)
                await self._send(message, closing)
            if closing:
                return  # the upstream closes too, and the relay then ends
            if self._kept is not None and self._kept_bytes >= self._limit:
                await self._room.wait()  # full: the client waits in TCP until committed

    async def _send(self, message: bytes, closing: bool) -> None:
        target = self._target
        if target is None:
            return  # between tries: kept for the next
        if self._kept is None:
            await target.send(message)  # committed: a failure ends the session
        else:
            try:
                await target.send(message)
            except Exception:
                return  # this try is failing; the next gets the message replayed
        if not closing:
            self._ask()

    def _ask(self) -> None:
        self.asked = True
        self._on_ask()
