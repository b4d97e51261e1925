"""The HTTP/1.1 server side: an aiohttp request in, the engine's pipeline, a response out.

Only HTTP lives here: the request target (absolute-form reduced to its path, dot segments
removed, unsafe escapes refused: what is routed is what is forwarded), the header size (431),
the body bounded in size (413) and time (408) and what routing needs from it, the headers an
upstream is sent, and the sink answers go to. Requests the HTTP parser refuses never get here
(connection.py). aiohttp cancels the handler when the client goes away
(handler_cancellation=True), which the engine treats as a disconnect.
"""

from __future__ import annotations

import asyncio
from itertools import chain

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from gateway.config.model import ServerConfig
from gateway.engine.context import RequestContext, request_id_from
from gateway.engine.pipeline import Proxy
from gateway.engine.sse import loads_json
from gateway.errors import BadRequest, HeadersTooLarge, RequestTimeout, RequestTooLarge
from gateway.protocols.grpc.bridge import enter_bridge
from gateway.protocols.http.headers import upstream_request_headers
from gateway.protocols.http.sink import HttpSink
from gateway.protocols.http.target import parse_target


def request_context(request: web.BaseRequest) -> RequestContext:
    """The engine's context for an aiohttp request (a plain one or a WebSocket upgrade)."""
    return RequestContext(
        request_id_from(request.headers.get("x-request-id")),
        request.method,
        request.raw_path,
        request.remote or "",
        asyncio.get_running_loop().time(),
    )


class HttpServer:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ctx = request_context(request)
        sink = HttpSink(request, ctx)
        await self.proxy.serve(ctx, HttpInbound(request, ctx), sink)
        return sink.response


class HttpInbound:
    """An aiohttp request as the engine's `Inbound`."""

    __slots__ = ("request", "ctx", "headers", "route_path")

    def __init__(self, request: web.BaseRequest, ctx: RequestContext) -> None:
        self.request = request
        self.ctx = ctx
        self.headers = request.headers
        self.route_path = request.path
        """Until `read` has normalised the target."""

    async def read(self, server: ServerConfig) -> None:
        """Check the target and headers, then buffer the body (bounded in size and time)
        and read what routing and admission need from it."""
        request, ctx = self.request, self.ctx
        _check_header_size(request, server.max_header_bytes)
        target = parse_target(request.raw_path)
        ctx.path, self.route_path = target.forward, target.path
        limit = server.max_request_body
        length = request.content_length
        if length is not None and length > limit:
            raise RequestTooLarge(f"request body of {length} bytes is over {limit}")
        content = request.content
        try:
            if content.is_eof():  # it all came with the headers: no timer, no wait
                body = content.read_nowait()
                if len(body) > limit:
                    raise RequestTooLarge(f"request body is over {limit} bytes")
            else:
                async with asyncio.timeout(server.body_timeout):
                    body = await _read_all(request, limit)
        except TimeoutError:
            message = f"the request body did not arrive within {server.body_timeout:g}s"
            raise RequestTimeout(message) from None
        except (RequestPayloadError, HttpProcessingError) as exc:
            # Framing broken mid-body (a bad chunk size, a short body): the client's fault.
            cause = type(exc.__cause__ or exc).__name__
            raise BadRequest(f"malformed request body ({cause})") from None
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
        request, ctx = self.request, self.ctx
        return upstream_request_headers(
            request.headers, ctx.request_id, ctx.client_ip, request.scheme
        )


def _check_header_size(request: web.BaseRequest, limit: int) -> None:
    """The parser bounds each header line and their count, not their total: this does."""
    raw = request.raw_headers
    size = sum(map(len, chain.from_iterable(raw))) + 4 * len(raw)
    if size > limit:
        raise HeadersTooLarge(f"request headers of {size} bytes are over {limit}")


async def _read_all(request: web.BaseRequest, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while data := await request.content.readany():
        size += len(data)
        if size > limit:
            raise RequestTooLarge(f"request body is over {limit} bytes")
        parts.append(data)
    return b"".join(parts)


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
