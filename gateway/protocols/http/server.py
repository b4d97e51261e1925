"""The HTTP/1.1 server side: a parsed request in, the engine's pipeline, a response out.

Only HTTP lives here: the request target (absolute-form reduced to its path, dot segments
removed, unsafe escapes refused: what is routed is what is forwarded), the header size (431),
the body bounded in size (413) and time (408) and what routing needs from it, the headers an
upstream is sent, and the sink answers go to. Requests the HTTP parser refuses never get here
(connection.py). The connection cancels the task serving a request when its client goes away,
which the engine treats as a disconnect.
"""

from __future__ import annotations

import asyncio

from gateway.config.model import ServerConfig
from gateway.engine.context import RequestContext, request_id_from
from gateway.engine.pipeline import Proxy
from gateway.engine.sse import loads_json
from gateway.errors import BadRequest, HeadersTooLarge, RequestTimeout, RequestTooLarge
from gateway.protocols.grpc.bridge import enter_bridge
from gateway.protocols.http.headers import upstream_request_headers
from gateway.protocols.http.request import ParsedRequest
from gateway.protocols.http.sink import HttpSink
from gateway.protocols.http.target import parse_target


def request_context(request, loop: asyncio.AbstractEventLoop) -> RequestContext:
    """The engine's context for a request: a parsed one, or aiohttp's WebSocket upgrade."""
    return RequestContext(
        request_id_from(request.headers.get("x-request-id")),
        request.method,
        request.raw_path,
        request.remote or "",
        loop,
    )


class HttpServer:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def handle(self, request: ParsedRequest, conn) -> HttpSink:
        ctx = request_context(request, conn.loop)
        sink = HttpSink(conn, request, ctx)
        await self.proxy.serve(ctx, HttpInbound(request, ctx, conn), sink)
        return sink


class HttpInbound:
    """A parsed request as the engine's `Inbound`."""

    __slots__ = ("request", "ctx", "conn", "headers", "route_path")

    def __init__(self, request: ParsedRequest, ctx: RequestContext, conn) -> None:
        self.request = request
        self.ctx = ctx
        self.conn = conn
        self.headers = request.headers
        self.route_path = request.raw_path.partition("?")[0]
        """Until `read` has normalised the target."""

    async def read(self, server: ServerConfig) -> None:
        """Check the target and headers, then wait for the body (bounded in size and time)
        and read what routing and admission need from it."""
        request, ctx = self.request, self.ctx
        if request.head_size > server.max_header_bytes:
            size, limit = request.head_size, server.max_header_bytes
            raise HeadersTooLarge(f"request headers of {size} bytes are over {limit}")
        target = parse_target(request.raw_path)
        ctx.path, self.route_path = target.forward, target.path
        limit = server.max_request_body
        length = request.content_length
        if length is not None and length > limit:
            raise RequestTooLarge(f"request body of {length} bytes is over {limit}")
        if request.complete:  # it all came with the headers: no timer, no wait
            body = b"".join(request.parts)
        else:
            self.conn.continue_if_expected(request)
            try:
                async with asyncio.timeout(server.body_timeout):
                    body = await request.wait_body(limit)
            except TimeoutError:
                message = f"the request body did not arrive within {server.body_timeout:g}s"
                raise RequestTimeout(message) from None
        if request.size > limit:
            raise RequestTooLarge(f"request body is over {limit} bytes")
        ctx.body = body
        declared = request.content_type == "application/json"
        if declared or body[:1] == b"{":
            _read_json(ctx, body, strict=declared)
        if not ctx.stream and "text/event-stream" in request.headers.get("accept", ""):
            ctx.stream = True

    async def admitted(self, route) -> None:
        """Everything was read before routing; a bridge route's tries call its gRPC method."""
        if route.grpc_bridge is not None:
            enter_bridge(self.ctx, route)

    def upstream_headers(self):
        ctx = self.ctx
        return upstream_request_headers(self.headers, ctx.request_id, ctx.client_ip, "http")


def _read_json(ctx: RequestContext, body: bytes, strict: bool) -> None:
    try:
        payload = loads_json(body) if body else None
    except ValueError as exc:
        if strict:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        return
    except RecursionError:  # nested deeper than the C decoder's stack allows
        if strict:
            raise BadRequest("request body is JSON nested too deeply") from None
        return  # not declared JSON: relayed as is, like any other body
    if isinstance(payload, dict):
        ctx.json = payload
        model = payload.get("model")
        ctx.model = model if isinstance(model, str) else None
        ctx.stream = payload.get("stream") is True
