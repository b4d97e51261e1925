"""The HTTP/1.1 upstream client: one request per try, through the pool's aiohttp session.

This is where aiohttp's client exceptions meet the engine: a connection that cannot be made
becomes `UpstreamConnectError` here, and `broken` names the exceptions that mean a dropped
exchange (the engine's condition `reset`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import aiohttp
from yarl import URL

from gateway.errors import UpstreamConnectError
from gateway.upstreams.pool import REQUEST_SENT, UpstreamPool


class HttpResponse:
    """An aiohttp response as the engine reads it: `read` is the body's own `readany`, so a
    chunk costs no wrapper call."""

    __slots__ = ("status", "headers", "read", "_response")

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

    broken = (aiohttp.ClientError, ConnectionError)

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        connect_timeout: float,
        on_sent: Callable[[], None],
    ) -> HttpResponse:
        pool = self.pool
        assert pool.session is not None
        sent = REQUEST_SENT.set(on_sent)
        try:
            response = await pool.session.request(
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
            raise UpstreamConnectError(f"cannot connect to upstream {pool.name!r}: {exc}") from exc
        finally:
            REQUEST_SENT.reset(sent)
        return HttpResponse(response)


def _with_configured(headers, pool: UpstreamPool):
    """Configured upstream headers replace the client's header of the same name."""
    if not pool.headers:
        return headers
    out = headers.copy()
    for name, value in pool.headers:
        out[name] = value
    return out
