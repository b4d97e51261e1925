"""Runtime: everything built from one config, swapped whole on reload.

A request takes the runtime current when it arrives and keeps it to its last byte, so streams
in flight finish under the config they started with.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.admission.admit import Admission
from gateway.config.model import GatewayConfig, WorkerPoolUpstream
from gateway.engine.context import RequestContext
from gateway.engine.hedge import HedgeBudget
from gateway.engine.routing import Router
from gateway.observe.access_log import AccessLog
from gateway.observe.metrics import NO_NAME, Metrics
from gateway.observe.tracing import NO_TRACING, NoTracing, Tracing
from gateway.upstreams.health import HealthChecker
from gateway.upstreams.pool import UpstreamPool
from gateway.upstreams.workers import WorkerSupervisor

log = logging.getLogger("streamgate")


class Runtime:
    def __init__(
        self,
        config: GatewayConfig,
        pools: dict[str, UpstreamPool],
        metrics: Metrics,
        admission: Admission,
        supervisors: dict[str, WorkerSupervisor] | None = None,
        tracing: Tracing | NoTracing = NO_TRACING,
    ) -> None:
        self.config = config
        self.router = Router(config.routes)
        self.hedge_budgets = {
            r.name: HedgeBudget(r.hedge.budget_percent) for r in config.routes if r.hedge
        }
        """Each hedging route's budget (hedge.py); a reload starts them afresh."""
        self.pools = pools
        self.metrics = metrics
        self.admission = admission
        self.tracing = tracing
        """Spans for requests that start under this config; shut down with the runtime."""
        self.in_flight = 0
        """Requests that took this runtime and have not finished (a reload waits for them)."""
        self._idle = asyncio.Event()
        self._idle.set()
        self.streams: set[RequestContext] = set()
        """Requests past the commit point (for /admin/streams and draining)."""
        self.access_log = AccessLog(config.telemetry.access_log == "json")
        self.health_checkers: list[HealthChecker] = []
        self.supervisors = supervisors if supervisors is not None else {}
        """Worker pools this runtime stops when it closes; a reload takes unchanged ones over."""

    async def close(self) -> None:
        for checker in self.health_checkers:
            await checker.stop()
        for name, pool in self.pools.items():
            if not isinstance(self.config.upstreams[name], WorkerPoolUpstream):
                await pool.close()  # a worker pool's belongs to its supervisor
        # Together: each may wait its stop_grace for workers to exit.
        await asyncio.gather(*(s.stop() for s in self.supervisors.values()))
        await self.admission.close()
        await self.tracing.aclose()  # flushes the last spans, from a thread

    def enter(self) -> None:
        if not self.in_flight:  # else it is clear already
            self._idle.clear()
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def idle(self) -> None:
        """Until no request is using this runtime."""
        await self._idle.wait()

    def stream_started(self, ctx: RequestContext) -> None:
        self.streams.add(ctx)
        self.metrics.active_streams.labels(ctx.route_name).inc()
        self.metrics.sessions.opened(ctx)

    def stream_ended(self, ctx: RequestContext) -> None:
        self.streams.discard(ctx)
        self.metrics.active_streams.labels(ctx.route_name).dec()
        self.metrics.sessions.closed(ctx)

    def observe(self, ctx: RequestContext) -> None:
        """Called once per request, however it ended: metrics and the access log line."""
        m, route, upstream = self.metrics, ctx.route_name or NO_NAME, ctx.upstream or NO_NAME
        m.requests.labels(route, upstream, str(ctx.status), "true" if ctx.stream else "false").inc()
        if ctx.outcome == "client_disconnect":
            m.client_disconnects.labels(route).inc()
        m.sessions.observe(ctx, route)
        if ctx.first_chunk_at is not None:  # committed: it was a stream (or a whole answer)
            now = ctx.loop.time()
            m.time_to_first_chunk.labels(route, upstream).observe(ctx.first_chunk_at - ctx.started)
            m.stream_duration.labels(route, ctx.outcome).observe(now - ctx.started)
            m.chunks_per_stream.labels(route).observe(ctx.chunks)
            if ctx.error_kind is not None:
                m.stream_errors.labels(route, ctx.error_kind).inc()
            if ctx.usage is not None:
                self._observe_usage(ctx, now)
        if self.config.telemetry.genai_metrics:
            m.genai.observe(ctx, ctx.loop.time())
        self.access_log.write(ctx)

    def _observe_usage(self, ctx: RequestContext, now: float) -> None:
        prompt, completion = ctx.usage
        m, route, upstream = self.metrics, ctx.route_name, ctx.upstream or NO_NAME
        m.tokens.labels(route, upstream, "prompt").inc(prompt)
        m.tokens.labels(route, upstream, "completion").inc(completion)
        streaming_s = now - ctx.first_chunk_at
        if ctx.stream and completion and streaming_s > 0:
            m.output_tokens_per_second.labels(route, upstream).observe(completion / streaming_s)
