"""The request path, for every protocol: read, route, admit, open, relay, observe.

    read    the protocol reads the request (bounded) so retries can replay it
    route   first matching rule in file order (404)
    admit   rate limits, token budgets, then concurrency (429 / 503); held until the last
            byte is written (a protocol that reads its request only after accepting the
            connection, as a WebSocket bridge reads its first message, does it here:
            `Inbound.admitted`); a stream a budget charged asks the upstream for its usage
            (`usage_request.py`), once, so every try sends the same body
    open    the upstream, retrying, hedging and falling back until the commit point
            (attempts.py)
    relay   commit the status and headers, then stream with backpressure (relay.py); a
            broken stream may be resumed through the same tries (resume.py)

Errors before the commit point are handed to the protocol's sink here, and only here. A client
that goes away cancels the task serving it, which unwinds every stage: its admission is
released and its upstream connection closed. Every request, however it ends, is observed
once (metrics, trace, access log).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Protocol

from gateway.config.model import ServerConfig
from gateway.config.routes import Route
from gateway.engine.attempts import Attempts
from gateway.engine.context import RequestContext
from gateway.engine.duplex import ClientHalf
from gateway.engine.exchange import ROUTE, Sink
from gateway.engine.relay import relay
from gateway.engine.routing import RequestFacts, upstream_protocol
from gateway.engine.runtime import Runtime
from gateway.engine.usage_request import ask_for_usage
from gateway.errors import Draining, GatewayError, InternalError, NoRoute

log = logging.getLogger("streamgate")


class Inbound(Protocol):
    """A request as a protocol received it."""

    headers: Mapping[str, str]
    """Case-insensitive: for routing, rate-limit keys and trace context."""
    route_path: str
    """The path routes match on."""

    async def read(self, server: ServerConfig) -> None:
        """Read the request (its target, headers and body, within `server`'s bounds) into
        the context; set `route_path`, and `ctx.deadline` if the caller sent its own."""

    async def admitted(self, route: Route) -> None:
        """The request is admitted on `route`: read what could not be read before (a
        WebSocket session accepted early reads its first message here)."""

    def upstream_headers(self) -> dict:
        """The headers every try sends upstream (a fresh, mutable copy)."""


class Proxy:
    """Where requests of every protocol enter the engine; drained as one at shutdown."""

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

    async def serve(self, ctx: RequestContext, inbound: Inbound, sink: Sink) -> None:
        runtime = self.runtime
        ctx.trace = runtime.tracing.request_span(ctx, inbound.headers)
        if not self.in_flight:  # else it is clear already
            self._idle.clear()
        self.in_flight.add(ctx)
        runtime.enter()
        try:
            if self.draining:
                raise Draining("the gateway is shutting down")
            await inbound.read(runtime.config.server)
            route = _route(runtime, ctx, inbound)
            ROUTE.set(route)
            # The caller's own deadline, where its protocol carries one, may be sooner.
            ctx.deadline = min(ctx.deadline, ctx.started + route.timeouts.total)
            async with runtime.admission.admit(ctx, route, inbound.headers):
                await inbound.admitted(route)
                if ctx.token_budget is not None:  # a token budget charged it
                    ask_for_usage(ctx)
                headers = inbound.upstream_headers()
                if sink.receive is not None:  # a two-way session: its client half
                    ctx.session = ClientHalf(sink, ctx, route.websocket.replay_buffer)
                budget = runtime.hedge_budgets.get(route.name)
                tries = Attempts(ctx, route, runtime.pools, headers, runtime.metrics, budget)
                opened = await tries.open()
                runtime.stream_started(ctx)
                try:
                    await relay(sink, ctx, opened, route, runtime.metrics, tries)
                finally:
                    runtime.stream_ended(ctx)
        except GatewayError as err:
            ctx.status, ctx.outcome, ctx.error_kind = err.status, err.outcome, err.condition
            await sink.refuse(err)
        except asyncio.CancelledError:  # the client went away
            ctx.client_gone()
            raise
        except Exception as exc:  # the last line of defence: a bug of ours
            await _internal_error(ctx, exc, sink)
        finally:
            if ctx.session is not None:  # a session whose tries all failed is still reading
                await ctx.session.stop()
            ctx.trace.end(ctx)
            runtime.observe(ctx)
            runtime.leave()
            self.in_flight.discard(ctx)
            if not self.in_flight:
                self._idle.set()


async def _internal_error(ctx: RequestContext, exc: Exception, sink: Sink) -> None:
    """An exception no stage translated: one concise log line (the traceback at debug level),
    a true access-log line, and a 500 in the protocol's words; after the commit point, the
    stream is cut."""
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
    if ctx.first_chunk_at is not None:  # committed: no second answer, end it visibly
        await sink.fail(None)
        return
    ctx.status = err.status
    await sink.refuse(err)


def _route(runtime: Runtime, ctx: RequestContext, inbound: Inbound) -> Route:
    facts = RequestFacts(ctx.method, inbound.route_path, inbound.headers, ctx.model, ctx.protocol)
    route = runtime.router.match(facts)
    if route is None:
        raise NoRoute(f"no route matches {ctx.method} {inbound.route_path}")
    ctx.route = route
    ctx.upstream_protocol = upstream_protocol(route)
    if route.grpc is not None:  # a relay cannot tell a streaming call: its route says
        ctx.stream = route.grpc.stream
    elif route.websocket_upstream is not None or route.grpc_bridge is not None:
        ctx.stream = True  # bridged to an event stream: charged as the stream it will be
    return route
