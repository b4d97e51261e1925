"""The HTTP/1.1 upstream client: one request per try.

Plain http:// endpoints go through the lean client (`plain_client.py`: an asyncio Protocol with
a C parser, its own keep-alive pool, body chunks pushed to the engine). https:// endpoints go
through one aiohttp session per pool, which also serves the pool's WebSocket client and health
probes. This is where aiohttp's client exceptions meet the engine: a connection that cannot be
made becomes `UpstreamConnectError` here, and `broken` names the exceptions that mean a dropped
exchange (the engine's condition `reset`). The session's connector tells the engine, through
`on_sent`, when the request goes out and whether on a kept-alive connection.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar

import aiohttp
from yarl import URL

from gateway.errors import UpstreamConnectError
from gateway.protocols.http.plain_client import PlainClient, PlainResponse
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.pool import UpstreamPool

REQUEST_SENT: ContextVar[Callable[[bool], None] | None] = ContextVar("request_sent", default=None)
"""Set by the try in progress: called once its connection is ready, which is when its request
goes out and `timeouts.first_chunk` starts counting; the argument says whether the connection
is a reused keep-alive one (which may have died while idle)."""


class HttpResponse:
    """An aiohttp response as the engine reads it: `read` is the body's own `readany`, so a
    chunk costs no wrapper call."""

    __slots__ = ("status", "headers", "read", "_response")
    framing = None  # the route's framing decides
    send = None  # request/response: nothing goes upstream once the request is sent
    stream = None  # the engine pulls with `read`
    conditions = ()  # an error is judged by its status and JSON error body

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.read = response.content.readany
        self._response = response

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


class HttpClient:
    """A pool's upstream side over HTTP/1.1."""

    broken = (aiohttp.ClientError, ConnectionError)  # the lean client's UpstreamBroken too

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.session: aiohttp.ClientSession | None = None
        self.plain = PlainClient(pool.name, pool.headers)

    async def start(self) -> None:
        connector = _Connector(
            limit=0,  # the pool's own slots bound requests in flight, with a wait of their own
            limit_per_host=0,
            ttl_dns_cache=60,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies are relayed byte for byte, encoding and all
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),  # every timeout is the route's
        )
        # aiohttp silently resends an idempotent request (GET, PUT, ...) once after a
        # disconnect. Retries are the route's policy, counted in retry.attempts; the one
        # exception, a dead keep-alive connection, is the engine's (engine/try_once.py).
        self.session._retry_connection = False

    async def close(self) -> None:
        self.plain.close()
        if self.session is not None:
            await self.session.close()

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        connect_timeout: float,
        on_sent: Callable[[bool], None],
        deadline: float = float("inf"),
    ) -> HttpResponse | PlainResponse:
        if url.startswith("http://"):
            return await self.plain.send(method, url, body, headers, connect_timeout, on_sent)
        pool = self.pool
        assert self.session is not None
        sent = REQUEST_SENT.set(on_sent)
        try:
            response = await self.session.request(
                method,
                URL(url, encoded=True),
                data=body or None,
                headers=_with_configured(headers, pool),
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=connect_timeout, sock_connect=connect_timeout
                ),
            )
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            refused = isinstance(getattr(exc, "os_error", None), ConnectionRefusedError)
            message = f"cannot connect to upstream {pool.name!r}: {exc}"
            raise UpstreamConnectError(message, refused=refused) from exc
        finally:
            REQUEST_SENT.reset(sent)
        return HttpResponse(response)

    def drop_idle(self, endpoint: Endpoint) -> None:
        if endpoint.url.startswith("http://"):
            self.plain.drop_idle(endpoint.url)
        if self.session is not None and isinstance(self.session.connector, _Connector):
            url = URL(endpoint.url)
            self.session.connector.drop_idle(url.host, url.port)


class _Connector(aiohttp.TCPConnector):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._used: weakref.WeakSet = weakref.WeakSet()

    # A context variable read here costs far less per request than aiohttp's trace hooks.
    async def connect(self, req, traces, timeout):
        connection = await super().connect(req, traces, timeout)
        request_sent = REQUEST_SENT.get()
        if request_sent is not None:
            protocol = connection.protocol
            reused = protocol in self._used
            self._used.add(protocol)
            request_sent(reused)
        return connection

    def drop_idle(self, host: str | None, port: int | None) -> None:
        """Close the idle keep-alive connections to one host. aiohttp has no public call for
        this; its pool is `_conns`, ConnectionKey -> deque of (protocol, idle since)."""
        for key in [k for k in self._conns if (k.host, k.port) == (host, port)]:
            for protocol, _ in self._conns.pop(key):
                protocol.close()


def _with_configured(headers, pool: UpstreamPool):
    """Configured upstream headers replace the client's header of the same name."""
    if not pool.headers:
        return headers
    out = headers.copy()
    for name, value in pool.headers:
        out[name] = value
    return out
