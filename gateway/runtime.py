"""Runtime: everything built from one config, swapped whole on reload.

A request takes the runtime current when it arrives and keeps it to its last byte, so streams
in flight finish under the config they started with.
"""

from __future__ import annotations

import asyncio
import logging

from .access_log import AccessLog
from .admission import Admission
from .config import GatewayConfig, HttpUpstream, WorkerPoolUpstream
from .context import RequestContext
from .health import HealthChecker
from .metrics import Metrics
from .routing import Router
from .tracing import NO_TRACING, NoTracing, Tracing
from .upstreams import UpstreamPool, http_pool
from .workers import WorkerSupervisor

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

    @classmethod
    async def start(
        cls, config: GatewayConfig, metrics: Metrics, previous: Runtime | None = None
    ) -> Runtime:
        """Build everything `config` names. On reload, `previous` hands over what may be kept,
        but only once the new runtime is whole: if any part fails to start, what was started
        is stopped and `previous` keeps everything it had."""
        pools = {
            name: http_pool(name, upstream)
            for name, upstream in config.upstreams.items()
            if isinstance(upstream, HttpUpstream)
        }
        kept = previous.supervisors if previous is not None else {}
        supervisors: dict[str, WorkerSupervisor] = {}
        try:
            for pool in pools.values():
                await pool.start()
            await _start_worker_pools(config, metrics, kept, supervisors)
            admission = await Admission.start(
                config, metrics, previous.admission if previous is not None else None
            )
            tracing = Tracing.from_config(config.telemetry.tracing)
        except BaseException:
            for pool in pools.values():
                await pool.close()
            started = [s for name, s in supervisors.items() if kept.get(name) is not s]
            await asyncio.gather(*(s.stop() for s in started))
            raise
        for name, supervisor in supervisors.items():
            if kept.get(name) is supervisor:
                del kept[name]  # taken over: the old runtime must not stop it
        pools.update((name, supervisor.pool) for name, supervisor in supervisors.items())
        runtime = cls(config, pools, metrics, admission, supervisors, tracing)
        for name, upstream in config.upstreams.items():
            if isinstance(upstream, HttpUpstream) and upstream.health is not None:
                checker = HealthChecker(pools[name], upstream.health)
                checker.start()
                runtime.health_checkers.append(checker)
        return runtime

    async def close(self) -> None:
        for checker in self.health_checkers:
            await checker.stop()
        for name, pool in self.pools.items():
            if isinstance(self.config.upstreams[name], HttpUpstream):
                await pool.close()  # a worker pool's belongs to its supervisor
        # Together: each may wait its stop_grace for workers to exit.
        await asyncio.gather(*(s.stop() for s in self.supervisors.values()))
        await self.admission.close()
        await self.tracing.aclose()  # flushes the last spans, from a thread

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    async def idle(self) -> None:
        """Until no request is using this runtime."""
        await self._idle.wait()

    def stream_started(self, ctx: RequestContext) -> None:
        self.streams.add(ctx)
        self.metrics.child(self.metrics.active_streams, ctx.route_name).inc()

    def stream_ended(self, ctx: RequestContext) -> None:
        self.streams.discard(ctx)
        self.metrics.child(self.metrics.active_streams, ctx.route_name).dec()

    def observe(self, ctx: RequestContext) -> None:
        """Called once per request, however it ended: metrics and the access log line."""
        m, route, upstream = self.metrics, ctx.route_name, ctx.upstream or ""
        m.child(
            m.requests, route, upstream, str(ctx.status), "true" if ctx.stream else "false"
        ).inc()
        if ctx.outcome == "client_disconnect":
            m.child(m.client_disconnects, route).inc()
        if ctx.first_chunk_at is not None:  # committed: it was a stream (or a whole answer)
            now = asyncio.get_running_loop().time()
            m.child(m.time_to_first_chunk, route, upstream).observe(
                ctx.first_chunk_at - ctx.started
            )
            m.child(m.stream_duration, route, ctx.outcome).observe(now - ctx.started)
            m.child(m.chunks_per_stream, route).observe(ctx.chunks)
            if ctx.error_kind is not None:
                m.child(m.stream_errors, route, ctx.error_kind).inc()
            if ctx.usage is not None:
                self._observe_usage(ctx, now)
        if self.config.telemetry.genai_metrics:
            m.genai.observe(ctx, asyncio.get_running_loop().time())
        self.access_log.write(ctx)

    def _observe_usage(self, ctx: RequestContext, now: float) -> None:
        prompt, completion = ctx.usage
        m, route, upstream = self.metrics, ctx.route_name, ctx.upstream or ""
        m.child(m.tokens, route, upstream, "prompt").inc(prompt)
        m.child(m.tokens, route, upstream, "completion").inc(completion)
        streaming_s = now - ctx.first_chunk_at
        if ctx.stream and completion and streaming_s > 0:
            m.child(m.output_tokens_per_second, route, upstream).observe(completion / streaming_s)


async def _start_worker_pools(
    config: GatewayConfig,
    metrics: Metrics,
    kept: dict[str, WorkerSupervisor],
    supervisors: dict[str, WorkerSupervisor],
) -> None:
    """Fill `supervisors` with one started supervisor per `worker_pool` upstream. One whose
    definition is unchanged in `kept` (the previous runtime's) is reused with its workers
    running; the previous runtime stops the others when it closes, once its streams are done."""
    for name, upstream in config.upstreams.items():
        if not isinstance(upstream, WorkerPoolUpstream):
            continue
        if name in kept and kept[name].config == upstream:
            supervisors[name] = kept[name]
        else:
            supervisors[name] = WorkerSupervisor(name, upstream, metrics)
            await supervisors[name].start()
