"""The proxy listener: accepts connections, serves them (`connection.py`), drains and stops.

WebSocket upgrades are handed, bytes and all, to an aiohttp server that runs only the
WebSocket adapter: everything else on the proxy listener is served here, without aiohttp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.config.model import ServerConfig
from gateway.observe.metrics import Metrics
from gateway.protocols.http.connection import HttpConnection
from gateway.protocols.http.refusals import Refusals
from gateway.protocols.http.request import ParsedRequest


class HttpListener:
    def __init__(
        self,
        handler: Callable[[ParsedRequest, HttpConnection], Awaitable[object]],
        upgrade_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        settings: Callable[[], ServerConfig],
        metrics: Metrics,
    ) -> None:
        self.handler = handler
        """Serves one request on a connection; returns its sink."""
        self.settings = settings
        self.refusals = Refusals(metrics)
        self.loop = asyncio.get_running_loop()
        self.connections: set[HttpConnection] = set()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._upgrades = web.Server(upgrade_handler, handler_cancellation=True, access_log=None)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> tuple[str, int]:
        self._server = await self.loop.create_server(
            lambda: HttpConnection(self), host, port, backlog=1024, reuse_address=True,
            reuse_port=reuse_port or None,
        )
        return self._server.sockets[0].getsockname()[:2]

    def upgrade(self, transport: asyncio.Transport, request: ParsedRequest, rest: bytes) -> None:
        """Hand a connection over to the WebSocket adapter, with what was read of it: the
        upgrade's head (remade from what was parsed) and the bytes after it."""
        head = f"{request.method} {request.raw_path} HTTP/{request.version}\r\n".encode("latin-1")
        lines = b"".join(b"%s: %s\r\n" % pair for pair in request.raw_headers)
        handler = self._upgrades()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(head + lines + b"\r\n" + rest)

    def close(self) -> None:
        """For a drain: no new connections; idle ones close now, busy ones after their answer."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close_if_idle()

    async def stop(self, timeout: float = 1.0) -> None:
        """Close every connection; requests still served get `timeout` to unwind."""
        self.close()
        tasks = [c.task for c in self.connections if c.task is not None]
        for conn in list(self.connections):
            conn.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self._upgrades.shutdown(timeout)
