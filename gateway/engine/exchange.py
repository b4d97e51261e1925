"""The two small interfaces between the engine and a protocol, and what passes between them.

A protocol adapter gives the engine:
- on the upstream side, an `UpstreamClient` per pool, whose `send` returns an
  `UpstreamResponse`: a status, headers, and a `read()` for the next body bytes;
- on the client side, a `Sink` per request: refuse it, send a whole answer, or commit a
  stream and take its frames, with a buffer the engine can watch and drain.

Everything in between (retries, the commit point, the clock, backpressure, cancellation,
observation) is the engine's, and the same for every protocol.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from gateway.config.routes import Route
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.engine.framing import Framing
    from gateway.upstreams.endpoint import Endpoint
    from gateway.upstreams.pool import UpstreamPool


ROUTE: ContextVar[Route] = ContextVar("route")
"""The route of the request being served, set by the pipeline once routed (each request is
its own task, so its own context). A protocol's client reads its route settings here (a
WebSocket's `max_message_size`, `answer_end`) so that `UpstreamClient.send` is the same for
every protocol."""


class UpstreamResponse(Protocol):
    """One upstream answer, its head read, its body being read."""

    status: int
    headers: Mapping[str, str]
    """Case-insensitive."""
    read: Callable[[], Awaitable[bytes]]
    """The next bytes of the body as they arrive; b"" at its end."""
    framing: Framing | None
    """The framing the protocol itself fixes (WebSocket: `Messages`); None lets the route's
    framing decide."""
    send: Callable[[bytes], Awaitable[None]] | None
    """For a two-way exchange: send one message envelope to the upstream (waiting while its
    connection is backed up); None for a request/response protocol."""
    stream: Callable[[Callable[[bytes], bool]], Awaitable[bool]] | None
    """Push mode, where the protocol offers it (None: the engine pulls with `read`).
    `await stream(on_data)` hands each body chunk to `on_data` as it arrives, from the
    protocol's own receive callback, with no await per chunk; it returns True at the body's
    end, or False as soon as `on_data` answered True (hold: the upstream is paused and nothing
    more is handed over until the next call). It raises what `read` would, and whatever
    `on_data` raised."""
    conditions: tuple[str, ...]
    """An error answer's names in the protocol's own words, matched against `retry.on` /
    `fallback_on` before the status code (gRPC: the status name, `UNAVAILABLE`); () for HTTP."""

    def release(self) -> None:
        """The whole body was read: the connection may serve another request."""

    def close(self) -> None:
        """Abandon the exchange: its connection is closed, never reused, so the backend
        stops generating for nobody."""


class UpstreamClient(Protocol):
    """A protocol's client side for one upstream pool."""

    broken: tuple[type[BaseException], ...]
    """Exceptions that mean the upstream dropped the exchange (the condition `reset`)."""

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        connect_timeout: float,
        on_sent: Callable[[bool], None],
        deadline: float = float("inf"),
    ) -> UpstreamResponse:
        """Send one request and read the response's head. Calls `on_sent(reused)` once the
        connection is ready and the request goes out (`reused`: on a kept-alive connection,
        which may have died while idle); raises `UpstreamConnectError` when no connection
        could be made (`refused=True` when nothing listened). `deadline` (event-loop time)
        is when the whole exchange must be over: a protocol that carries deadlines (gRPC)
        sends the upstream what is left of it; the engine's own timers enforce it anyway."""
        ...

    def drop_idle(self, endpoint: Endpoint) -> None:
        """Close the idle kept-alive connections to `endpoint` (its process is gone)."""

    async def start(self) -> None:
        """Open what `send` needs (a session, a channel); called once before any try."""

    async def close(self) -> None:
        """Close every connection; called when the pool's runtime is done."""


class Opened:
    """The upstream answer the client will get, with what was read of it before committing."""

    __slots__ = (
        "status", "headers", "head", "complete", "framing", "response", "pool", "endpoint",
        "tried",
    )

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        head: bytes,
        complete: bool,
        framing: Framing | None = None,
        response: UpstreamResponse | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.head = head
        """Body bytes already read; written first."""
        self.complete = complete
        """The whole body is in `head`: nothing more to read from the upstream."""
        self.framing = framing
        """How the rest of the body is cut into frames (None for a whole answer)."""
        self.response = response
        self.pool: UpstreamPool | None = None
        self.endpoint: Endpoint | None = None
        self.tried = None
        """The engine's record of the request that got this answer (`order.Try`)."""

    def finish(self, clean: bool) -> None:
        """Let go of the upstream: the connection is reused only after a whole body;
        otherwise it is closed."""
        if self.endpoint is not None:
            self.pool.release(self.endpoint)
            self.endpoint = None
        if self.response is not None:
            if clean:
                self.response.release()
            else:
                self.response.close()
            self.response = None


class Sink(Protocol):
    """A protocol's server side for one request: where the engine sends its answer.

    Before the commit point the engine calls exactly one of `refuse`, `send_whole` or
    `commit`. After `commit`, frames go through `write` (never blocking; `buffered` tells how
    much the client has not taken yet, and `drain` waits for it), and the stream ends with
    `finish` or, visibly, with `fail`.
    """

    write: Callable[[bytes], None]
    buffered: Callable[[], int]
    closing: Callable[[], bool]
    """True once the client is gone."""
    receive: Callable[[], Awaitable[bytes]] | None
    """For a two-way exchange, once committed: the client's next message envelope (its
    close as a CLOSE envelope), b"" once nothing more will come; None for HTTP."""

    async def open(self, headers: Mapping[str, str]) -> None:
        """A two-way exchange only (`receive` set): a try's upstream accepted it (`headers`:
        its acceptance). The first call connects the client before the commit point, so that
        it can ask; a later try (a failover) must agree with what the client was given, or
        raise a GatewayError (the condition fails that try)."""

    async def refuse(self, err: GatewayError) -> None:
        """Before the commit point: the error in the protocol's words (once connected by
        `open`, a two-way client is closed with it)."""

    async def send_whole(self, opened: Opened) -> None: ...

    async def commit(self, opened: Opened, first: bytes) -> None:
        """Send the status and headers together with the first frames; raises
        ConnectionResetError when the client is already gone."""

    async def drain(self) -> None: ...

    async def finish(self, tail: bytes) -> None:
        """A clean end, after the bytes left past the last whole frame (if any)."""

    async def fail(self, last_frame: bytes | None) -> None:
        """End a committed stream visibly: `last_frame` (the framing's error frame) and a
        close, or, without one, an aborted connection."""
