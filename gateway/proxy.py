"""The request handler: the whole pipeline on one screen.

    check   the header size (431) and the request target: absolute-form reduced to its path,
            dot segments removed, unsafe escapes refused (400); what is routed is forwarded
    read    the body, bounded by server.max_request_body (413) and server.body_timeout (408),
            so retries can replay it
    route   first matching rule in file order, on the normalised path (404)
    admit   rate limits, then concurrency (429 / 503); held until the last byte is written
    open    the upstream, retrying and falling back until the first content chunk (attempt.py)
    relay   commit the status and headers, then stream with backpressure (relay.py)

Errors before the commit point become JSON error responses here, and only here; so does an
exception nobody translated (a bug: 500 `internal_error`, one log line), and the access log
says what the client got. A client that goes away cancels the handler
(handler_cancellation=True), which unwinds every stage: its admission is released and its
upstream connection closed. Requests the HTTP parser refuses never get here (`server.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .attempt import open_stream
from .config import ServerConfig
from .context import RequestContext, request_id_from
from .errors import (
    BadRequest,
    Draining,
    GatewayError,
    HeadersTooLarge,
    InternalError,
    NoRoute,
    RequestTimeout,
    RequestTooLarge,
    error_response,
)
from .headers import add_rate_limit_headers, upstream_request_headers
from .paths import parse_target
from .relay import CLIENT_CLOSED, relay
from .routing import RequestFacts
from .runtime import Runtime

log = logging.getLogger("streamgate")


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
            server = runtime.config.server
            check_header_size(request, server.max_header_bytes)
            target = parse_target(request.raw_path)
            ctx.path = target.forward
            await read_body(request, ctx, server)
            route = match_route(runtime, request, ctx, target.path)
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
            if isinstance(err, RequestTimeout) or request.content.exception() is not None:
                await send_and_close(request, response)
            return response
        except asyncio.CancelledError:  # the client went away (handler_cancellation)
            ctx.status, ctx.outcome = CLIENT_CLOSED, "client_disconnect"
            raise
        except Exception as exc:  # the last line of defence: a bug of ours
            return internal_error(request, ctx, exc)
        finally:
            ctx.trace.end(ctx)
            runtime.observe(ctx)
            runtime.leave()
            self.in_flight.discard(ctx)
            if not self.in_flight:
                self._idle.set()


def internal_error(
    request: web.BaseRequest, ctx: RequestContext, exc: Exception
) -> web.StreamResponse:
    """An exception no stage translated: one concise log line (the traceback at debug level),
    a true access-log line, and a JSON 500; after the commit point, an aborted connection."""
    err = InternalError(f"internal error ({type(exc).__name__})")
    ctx.outcome, ctx.error_kind = err.outcome, err.condition
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}" if tb else "?"
    log.error(
        "internal error on request %s (%s %.200s): %s: %.200s at %s",
        ctx.request_id,
        ctx.method,
        ctx.path,
        type(exc).__name__,
        exc,
        where,
    )
    log.debug("internal error on request %s", ctx.request_id, exc_info=exc)
    if ctx.first_chunk_at is not None:  # committed: no second response, end it visibly
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("aborted after an internal error") from None
    ctx.status = err.status
    response = error_response(err, ctx.request_id)
    response.force_close()
    return response


async def send_and_close(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """The rest of the body is not coming, or is garbage: answer, then close at once, rather
    than let aiohttp linger reading a body nobody wants (that would hold a slow client's
    connection for its `lingering_time` more)."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    if request.transport is not None:
        request.transport.close()  # after the buffered answer is flushed


def check_header_size(request: web.BaseRequest, limit: int) -> None:
    """The parser bounds each header line and their count, not their total: this does."""
    raw = request.raw_headers
    size = sum(len(name) + len(value) for name, value in raw) + 4 * len(raw)
    if size > limit:
        raise HeadersTooLarge(f"request headers of {size} bytes are over {limit}")


async def read_body(request: web.BaseRequest, ctx: RequestContext, server: ServerConfig) -> None:
    """Buffer the request body (bounded in size and time), and read what routing and admission
    need from it."""
    limit = server.max_request_body
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLarge(f"request body of {request.content_length} bytes is over {limit}")
    reading = _read_all(request, limit)
    try:
        if request.content.is_eof():  # it all came with the headers: no timer needed
            body = await reading
        else:
            async with asyncio.timeout(server.body_timeout):
                body = await reading
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {server.body_timeout:g}s"
        ) from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        # Framing broken mid-body (a bad chunk size, a short body): the client's fault.
        cause = type(exc.__cause__ or exc).__name__
        raise BadRequest(f"malformed request body ({cause})") from None
    ctx.body = body
    if body[:1] == b"{" or request.content_type == "application/json":
        _read_json(ctx, body, strict=request.content_type == "application/json")
    if not ctx.stream and "text/event-stream" in request.headers.get("accept", ""):
        ctx.stream = True


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
        payload = json.loads(body) if body else None
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


def match_route(runtime: Runtime, request: web.BaseRequest, ctx: RequestContext, path: str):
    facts = RequestFacts(request.method, path, request.headers, ctx.model)
    route = runtime.router.match(facts)
    if route is None:
        raise NoRoute(f"no route matches {request.method} {path}")
    ctx.route = route
    return route
