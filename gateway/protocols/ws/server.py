"""The WebSocket server side: an upgrade request in, the engine's pipeline, a session out.

Only the handshake and the session's first message live here: the request target and headers
are checked as for HTTP, routing takes only routes with a `websocket` block, and once admitted
a passthrough session tries its upstream with the WebSocket client, while a bridge accepts the
client and reads its first message as the request body. Everything else (retries, the commit
point, the clock, buffering, cancellation, observation) is the engine's.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import WSMsgType, web

from gateway.config.model import ServerConfig
from gateway.config.routes import Route
from gateway.engine.context import RequestContext
from gateway.engine.pipeline import Proxy
from gateway.errors import BadRequest, RequestTimeout
from gateway.protocols.http.headers import upstream_request_headers
from gateway.protocols.http.server import request_context
from gateway.protocols.http.target import parse_target
from gateway.protocols.ws.sink import WsSink


class WsServer:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ctx = request_context(request, asyncio.get_running_loop())
        ctx.stream = True  # a session holds a stream's units for its whole life
        ctx.protocol = "websocket"
        sink = WsSink(request, ctx)
        await self.proxy.serve(ctx, WsInbound(request, ctx, sink), sink)
        return sink.response


class WsInbound:
    """An upgrade request as the engine's `Inbound`."""

    __slots__ = ("request", "ctx", "sink", "headers", "route_path", "server")

    def __init__(self, request: web.BaseRequest, ctx: RequestContext, sink: WsSink) -> None:
        self.request, self.ctx, self.sink = request, ctx, sink
        self.headers = request.headers
        self.route_path = request.path
        self.server: ServerConfig | None = None

    async def read(self, server: ServerConfig) -> None:
        request, ctx = self.request, self.ctx
        self.server = server
        target = parse_target(request.raw_path)
        ctx.path, self.route_path = target.forward, target.path
        if request.method != "GET" or "sec-websocket-key" not in request.headers:
            raise BadRequest("a WebSocket upgrade is a GET with Sec-WebSocket-Key")

    async def admitted(self, route: Route) -> None:
        config = self.sink.config = route.websocket
        if config.upstream == "websocket":
            return  # the client is upgraded once an upstream has accepted the session
        await self.sink.accept()
        await self._read_first_message()

    async def _read_first_message(self) -> None:
        """A bridge's request: the client's first message, POSTed with "stream": true."""
        ctx, limit = self.ctx, self.server.body_timeout
        try:
            async with asyncio.timeout(limit):
                msg = await self.sink.ws.receive()
        except TimeoutError:
            raise RequestTimeout(f"no request message within {limit:g}s") from None
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            raise asyncio.CancelledError  # the client left before asking anything
        try:
            payload = json.loads(msg.data)
        except (ValueError, RecursionError):
            raise BadRequest("the first message is not a JSON request body") from None
        if not isinstance(payload, dict):
            raise BadRequest("the first message is not a JSON object")
        payload["stream"] = True
        ctx.json, ctx.body, ctx.method = payload, json.dumps(payload).encode(), "POST"
        model = payload.get("model")
        ctx.model = model if isinstance(model, str) else None

    def upstream_headers(self):
        ctx = self.ctx
        headers = upstream_request_headers(
            self.request.headers, ctx.request_id, ctx.client_ip, self.request.scheme
        )
        if ctx.upstream_protocol == "http":  # a bridge: an SSE request, not a handshake
            for name in [k for k in headers if k.lower().startswith("sec-websocket-")]:
                del headers[name]
            headers["Content-Type"] = "application/json"
            headers["Accept"] = "text/event-stream"
        return headers
