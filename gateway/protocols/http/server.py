"""The HTTP/1.1 server side: an aiohttp request in, the engine's pipeline, a response out.

Only HTTP lives here: reading the bounded request body and what routing needs from it, the
headers an upstream is sent, and the sink answers go to. aiohttp cancels the handler when the
client goes away (handler_cancellation=True), which the engine treats as a disconnect.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from gateway.engine.context import RequestContext, request_id_from
from gateway.engine.pipeline import Proxy
from gateway.errors import BadRequest, RequestTooLarge
from gateway.protocols.http.headers import upstream_request_headers
from gateway.protocols.http.sink import HttpSink


class HttpServer:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ctx = RequestContext(
            request_id_from(request.headers.get("x-request-id")),
            request.method,
            request.raw_path,
            request.remote or "",
            asyncio.get_running_loop().time(),
        )
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

    async def read_body(self, limit: int) -> None:
        """Buffer the request body (bounded), and read what routing and admission need."""
        request, ctx = self.request, self.ctx
        if request.content_length is not None and request.content_length > limit:
            raise RequestTooLarge(f"request body of {request.content_length} bytes is over {limit}")
        parts: list[bytes] = []
        size = 0
        while data := await request.content.readany():
            size += len(data)
            if size > limit:
                raise RequestTooLarge(f"request body is over {limit} bytes")
            parts.append(data)
        ctx.body = body = b"".join(parts)
        if body[:1] == b"{" or request.content_type == "application/json":
            _read_json(ctx, body, strict=request.content_type == "application/json")
        if not ctx.stream and "text/event-stream" in request.headers.get("accept", ""):
            ctx.stream = True

    def upstream_headers(self):
        request, ctx = self.request, self.ctx
        return upstream_request_headers(
            request.headers, ctx.request_id, ctx.client_ip, request.scheme
        )


def _read_json(ctx: RequestContext, body: bytes, strict: bool) -> None:
    try:
        payload = json.loads(body) if body else None
    except ValueError as exc:
        if strict:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        return
    if isinstance(payload, dict):
        ctx.json = payload
        model = payload.get("model")
        ctx.model = model if isinstance(model, str) else None
        ctx.stream = payload.get("stream") is True
