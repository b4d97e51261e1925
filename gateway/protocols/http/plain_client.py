"""The lean upstream client for plain http:// endpoints: kept-alive `UpstreamConnection`s.

What it keeps from the aiohttp client it replaces on this path, as guarantees:
- a connection is reused only after a complete response both sides keep alive; one whose
  exchange was cancelled or abandoned mid-body is aborted, never pooled (`PlainResponse.close`),
  so the backend stops generating for nobody;
- requests in flight per upstream are bounded by the pool's `max_connections` slots (one
  connection each), so idle connections never outnumber them;
- a connection that cannot be made, or not within `timeouts.connect`, is `UpstreamConnectError`
  (`refused=True` when nothing listened);
- a kept-alive connection is tried as `reused`: if the upstream closed it while idle, the
  engine's free retry takes a fresh one (`try_once`);
- an idle connection unused for `KEEPALIVE_S` is closed.

The request head is written in one piece with the body: the route's filtered headers, then the
upstream's configured ones (rendered once), which replace the client's of the same name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from yarl import URL

from gateway.errors import UpstreamConnectError
from gateway.protocols.http.upstream_conn import UpstreamConnection

KEEPALIVE_S = 15.0
"""How long an idle kept-alive connection is kept for reuse (aiohttp's default, too)."""

_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
"""Methods sent without a Content-Length when they carry no body."""


class Origin:
    """One endpoint's address, its Host line, and its idle connections (most recent last)."""

    __slots__ = ("host", "port", "host_line", "idle")

    def __init__(self, base: str) -> None:
        url = URL(base)
        self.host, self.port = url.raw_host, url.port
        self.host_line = f"Host: {url.host_port_subcomponent}"
        self.idle: list[UpstreamConnection] = []

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection was lost: if it was idle, it is no longer on offer."""
        if conn in self.idle:
            self.idle.remove(conn)


class PlainResponse:
    """One exchange on one connection, as the engine reads it."""

    __slots__ = ("status", "headers", "read", "stream", "_conn", "_client", "_origin")
    framing = None  # the route's framing decides
    send = None  # request/response: nothing goes upstream once the request is sent
    conditions = ()  # an error is judged by its status and JSON error body

    def __init__(self, conn: UpstreamConnection, client: PlainClient, origin: Origin) -> None:
        self.status = conn.status
        self.headers = conn.headers
        self.read = conn.read
        self.stream = conn.stream
        self._conn, self._client, self._origin = conn, client, origin

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client.put_back(conn, self._origin)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.reusable:  # read to its end (an error answer judged whole): nothing to stop
            self._client.put_back(conn, self._origin)
        else:
            conn.abort()


class PlainClient:
    """Requests to http:// endpoints of one upstream pool."""

    def __init__(self, name: str, configured: tuple[tuple[str, str], ...]) -> None:
        self.name = name
        self._configured_names = frozenset(n.lower() for n, _ in configured)
        self._configured = [f"{n}: {v}" for n, v in configured]
        self._origins: dict[str, Origin] = {}
        self._closed = False
        self._sweeping: asyncio.TimerHandle | None = None

    def origin(self, url: str) -> tuple[Origin, str]:
        """The endpoint `url` is on, and the request target (path and query) on it."""
        cut = url.find("/", url.find("//") + 2)
        base, target = (url, "/") if cut < 0 else (url[:cut], url[cut:])
        origin = self._origins.get(base)
        if origin is None:
            origin = self._origins[base] = Origin(base)
        return origin, target

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        connect_timeout: float,
        on_sent: Callable[[bool], None],
        deadline: float = float("inf"),
    ) -> PlainResponse:
        origin, target = self.origin(url)
        request = self._request(method, target, origin, headers, body)
        conn = _idle_connection(origin)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(origin, connect_timeout)
        try:
            on_sent(reused)
            conn.begin(request, method == "HEAD")
            await conn.head()
        except BaseException:
            conn.abort()  # cancelled or broken before the answer: never reused
            raise
        return PlainResponse(conn, self, origin)

    async def _connect(self, origin: Origin, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, origin.forget), origin.host, origin.port
                )
        except TimeoutError:  # (an OSError too, so first)
            message = f"cannot connect to upstream {self.name!r}: no connection within {timeout:g}s"
            raise UpstreamConnectError(message) from None
        except OSError as exc:
            message = f"cannot connect to upstream {self.name!r} at {origin.host}:{origin.port}"
            refused = isinstance(exc, ConnectionRefusedError)
            raise UpstreamConnectError(f"{message}: {exc}", refused=refused) from exc
        return conn

    def _request(
        self, method: str, target: str, origin: Origin, headers: Mapping[str, str], body: bytes
    ) -> bytes | list[bytes]:
        skip = self._configured_names
        lines = [f"{method} {target} HTTP/1.1"]
        if "host" not in skip:
            lines.append(origin.host_line)
        if skip:
            lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in skip]
        else:
            lines += [f"{k}: {v}" for k, v in headers.items()]
        lines += self._configured
        if body or method not in _BODYLESS:
            lines.append(f"Content-Length: {len(body)}")
        head = _check_lines(lines).encode("utf-8", "surrogateescape")
        if len(body) > 16384:
            return [head, body]  # one writev, no copy of a large body
        return head + body

    def put_back(self, conn: UpstreamConnection, origin: Origin) -> None:
        """The engine is done with `conn`'s exchange: pooled if it may serve another."""
        if not conn.reusable or self._closed:
            conn.abort()
            return
        conn.finish()
        loop = conn.loop
        conn.idle_since = loop.time()
        origin.idle.append(conn)
        if self._sweeping is None:
            self._sweeping = loop.call_later(KEEPALIVE_S, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for KEEPALIVE_S; come back while any are left."""
        self._sweeping = None
        loop = asyncio.get_running_loop()
        stale = loop.time() - KEEPALIVE_S
        oldest = None
        for origin in self._origins.values():
            for conn in [c for c in origin.idle if c.idle_since <= stale]:
                origin.idle.remove(conn)
                conn.abort()
            if origin.idle:
                first = origin.idle[0].idle_since
                oldest = first if oldest is None else min(oldest, first)
        if oldest is not None:
            self._sweeping = loop.call_at(oldest + KEEPALIVE_S, self._sweep)

    def drop_idle(self, url: str) -> None:
        origin, _ = self.origin(url)
        idle, origin.idle = origin.idle, []
        for conn in idle:
            conn.abort()

    def close(self) -> None:
        self._closed = True
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        for origin in self._origins.values():
            idle, origin.idle = origin.idle, []
            for conn in idle:
                conn.abort()


def _idle_connection(origin: Origin) -> UpstreamConnection | None:
    idle = origin.idle
    while idle:
        conn = idle.pop()
        if not conn.lost:
            return conn
    return None


def _check_lines(lines: list[str]) -> str:
    """The head, refusing a CR or LF inside a line (header injection)."""
    text = "\r\n".join(lines) + "\r\n\r\n"
    if text.count("\n") != len(lines) + 1 or text.count("\r") != len(lines) + 1:
        raise ValueError("a request line or header holds a CR or LF")
    return text
