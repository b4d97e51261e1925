"""The request handler: the whole pipeline on one screen.

    read    the body, bounded by server.max_request_body (413), so retries can replay it
    route   first matching rule in file order (404)
    admit   rate limits, then concurrency (429 / 503); held until the last byte is written
    open    the upstream, retrying and falling back until the first content chunk (attempt.py)
    relay   commit the status and headers, then stream with backpressure (relay.py)

Errors before the commit point become JSON error responses here, and only here. A client that
goes away cancels the handler (handler_cancellation=True), which unwinds every stage: its
admission is released and its upstream connection closed.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from .attempt import open_stream
from .context import RequestContext, request_id_from
from .errors import BadRequest, Draining, GatewayError, NoRoute, RequestTooLarge, error_response
from .headers import add_rate_limit_headers, upstream_request_headers
from .relay import CLIENT_CLOSED, relay
from .routing import RequestFacts
from .runtime import Runtime


class Proxy:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        """Swapped whole on reload; each request keeps the one it started with."""
        self.draining = False
        self.in_flight: set[RequestContext] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def idle(self) -> None:
        """Until no request is in flight."""
        await self._idle.wait()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        runtime = self.runtime
        loop = asyncio.get_running_loop()
        ctx = RequestContext(
            request_id_from(request.headers.get("x-request-id")),
            request.method,
            request.raw_path,
            request.remote or "",
            loop.time(),
        )
        ctx.trace = runtime.tracing.request_span(ctx, request.headers)
        self.in_flight.add(ctx)
        self._idle.clear()
        runtime.enter()
        try:
            if self.draining:
                raise Draining("the gateway is shutting down")
            await read_body(request, ctx, runtime.config.server.max_request_body)
            route = match_route(runtime, request, ctx)
            ctx.deadline = ctx.started + route.timeouts.total
            async with runtime.admission.admit(ctx, route, request):
                headers = upstream_request_headers(
                    request.headers, ctx.request_id, ctx.client_ip, request.scheme
                )
                opened = await open_stream(ctx, route, runtime.pools, headers, runtime.metrics)
                runtime.stream_started(ctx)
                try:
                    return await relay(request, ctx, opened, route, runtime.metrics)
                finally:
                    runtime.stream_ended(ctx)
        except GatewayError as err:
            ctx.status, ctx.outcome, ctx.error_kind = err.status, err.outcome, err.condition
            response = error_response(err, ctx.request_id)
            add_rate_limit_headers(response.headers, ctx.rate_remaining)
            return response
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            ctx.status, ctx.outcome = CLIENT_CLOSED, "client_disconnect"
            raise
        finally:
            ctx.trace.end(ctx)
            runtime.observe(ctx)
            runtime.leave()
            self.in_flight.discard(ctx)
            if not self.in_flight:
                self._idle.set()


async def read_body(request: web.BaseRequest, ctx: RequestContext, limit: int) -> None:
    """Buffer the request body (bounded), and read what routing and admission need from it."""
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


def match_route(runtime: Runtime, request: web.BaseRequest, ctx: RequestContext):
    facts = RequestFacts(request.method, request.path, request.headers, ctx.model)
    route = runtime.router.match(facts)
    if route is None:
        raise NoRoute(f"no route matches {request.method} {request.path}")
    ctx.route = route
    return route
