"""Open the upstream answer, retrying until the commit point is in hand.

This is the only place retries live, for every protocol. Everything before the commit point is
retryable and nothing has reached the client yet; `open_stream` either returns an `Opened`
answer (the commit point has been reached, or a complete answer is ready to relay) or raises
the `GatewayError` the client should get.

Order of tries: the route's upstream, then each fallback. On each, up to `retry.attempts`
tries (the first included), preferring an endpoint this request has not tried. After a failure:
- a condition in `retry.fallback_on` moves to the next fallback at once;
- a condition in `retry.on` tries the same upstream again after backoff (an upstream
  `Retry-After` honoured up to `backoff.max`), then moves on;
- any other condition is final: an upstream's answer is relayed as sent, a connection
  failure becomes 502, a timeout 504.
When everything has failed, the client gets the most recent answer any upstream sent.

One kind of failure costs no try: one that provably never reached a live server process (the
connection was refused, or a reused keep-alive connection turned out dead before any response
byte, as when a worker was killed). It is retried at once on another endpoint (or a fresh
connection), at most once per endpoint of the upstream, without consuming a `retry.attempts`
try: the operator's count is of requests an upstream could have worked on.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping

from gateway.config.routes import Backoff, Route
from gateway.engine.commit import AttemptFailed, HeldResponse
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened
from gateway.engine.try_once import try_once
from gateway.errors import (
    GatewayError,
    NoHealthyUpstream,
    PoolExhausted,
    UpstreamConnectError,
    UpstreamTimeout,
)
from gateway.observe.metrics import Metrics
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.pool import UpstreamPool


async def open_stream(
    ctx: RequestContext,
    route: Route,
    pools: Mapping[str, UpstreamPool],
    headers: dict,
    metrics: Metrics,
) -> Opened:
    tries = _Tries(ctx, route, headers, metrics)
    hops = _hops(route)
    loop = asyncio.get_running_loop()
    for i, (upstream, model) in enumerate(hops):
        # A pool with nothing in rotation is skipped while a later hop has something; when
        # none has, it is tried anyway if in panic (rather than refusing the request).
        later = hops[i + 1 :]
        last_resort = not any(pools[u].has_endpoint_for(m or ctx.model) for u, m in later)
        opened = await tries.on_upstream(pools[upstream], model, last_resort)
        if opened is not None:
            return opened
        if loop.time() >= ctx.deadline:
            break
    if tries.held is not None:
        return tries.held.opened()
    raise tries.error or NoHealthyUpstream("no upstream could be tried")


class _Tries:
    """One request's tries across its hops, and what the failed ones left behind."""

    __slots__ = ("ctx", "route", "headers", "metrics", "held", "error", "retry_reason")

    def __init__(self, ctx: RequestContext, route: Route, headers: dict, metrics: Metrics) -> None:
        self.ctx, self.route, self.headers, self.metrics = ctx, route, headers, metrics
        self.held: HeldResponse | None = None
        self.error: GatewayError | None = None
        self.retry_reason: str | None = None  # why the next try, if one happens, is a retry

    async def on_upstream(
        self, pool: UpstreamPool, model: str | None, last_resort: bool
    ) -> Opened | None:
        """Up to `retry.attempts` tries on one upstream: the Opened answer, None to move on
        to the next hop, or (for an unlisted condition) the final answer raised or returned."""
        ctx, policy = self.ctx, self.route.retry
        body = _with_model(ctx, model)
        sent_model = model if model is not None else ctx.model
        tried: set[Endpoint] = set()
        attempt, free_left = 0, len(pool.endpoints)
        while attempt < policy.attempts:
            endpoint = pool.pick(tried, sent_model, last_resort)
            if endpoint is None:
                self.error = self.error or NoHealthyUpstream(
                    f"upstream {pool.name!r} has no endpoint in rotation"
                )
                return None
            self._count_retry()
            tried.add(endpoint)
            try:
                opened = await self._try(pool, endpoint, body, sent_model)
            except AttemptFailed as failed:
                self.held = failed.held or self.held
                self.error = failed.error
                if failed.free and free_left:
                    free_left -= 1
                    self.retry_reason = failed.reason
                    continue
                attempt += 1
                matched = _decide(failed.conditions, self.route)
                if matched is None:
                    return _final(failed)
                self.retry_reason = failed.reason
                if matched == "fallback" or attempt == policy.attempts:
                    return None
                if not await self._backoff(attempt, failed.retry_after):
                    return None
            else:
                return opened
        return None

    def _count_retry(self) -> None:
        if self.retry_reason is not None:  # a retry is a try that follows a failure
            self.metrics.retries.labels(self.route.name, self.retry_reason).inc()
            self.ctx.trace.retry(self.retry_reason)
            self.retry_reason = None

    async def _try(
        self, pool: UpstreamPool, endpoint: Endpoint, body: bytes, model: str | None
    ) -> Opened:
        ctx, metrics = self.ctx, self.metrics
        ctx.upstream, ctx.endpoint = pool.name, endpoint.url
        ctx.attempts += 1
        span = ctx.trace.attempt(pool.name, endpoint.url, self.headers)
        try:
            opened = await try_once(ctx, self.route, pool, endpoint, body, model, self.headers)
        except AttemptFailed as failed:
            outcome = _attempt_outcome(failed)
            span.failed(outcome, failed.reason, failed.held.status if failed.held else None)
            metrics.upstream_attempts.labels(pool.name, outcome).inc()
            raise
        span.answered(opened.status)
        outcome = "ok" if opened.status < 400 else "upstream_error"
        metrics.upstream_attempts.labels(pool.name, outcome).inc()
        return opened

    async def _backoff(self, attempt: int, retry_after: float | None) -> bool:
        """Sleep before the next try; False when that would run past the deadline."""
        loop = asyncio.get_running_loop()
        delay = backoff_delay(self.route.retry.backoff, attempt, retry_after)
        if loop.time() + delay >= self.ctx.deadline:
            return False
        await asyncio.sleep(delay)
        return True


def _attempt_outcome(failed: AttemptFailed) -> str:
    if isinstance(failed.error, PoolExhausted):
        return "pool_exhausted"
    if isinstance(failed.error, UpstreamTimeout):
        return "timeout"
    if isinstance(failed.error, UpstreamConnectError):
        return "connect_error"
    return "upstream_error"


def _hops(route: Route) -> list[tuple[str, str | None]]:
    return [(route.upstream, None)] + [(f.upstream, f.model) for f in route.fallbacks]


def _with_model(ctx: RequestContext, model: str | None) -> bytes:
    if model is None or ctx.json is None:
        return ctx.body
    return json.dumps({**ctx.json, "model": model}).encode()


def _decide(conditions: tuple[str, ...], route: Route) -> str | None:
    """ "fallback", "retry", or None when no condition is listed (the failure is final)."""
    policy = route.retry
    if any(c in policy.fallback_on for c in conditions):
        return "fallback"
    if any(c in policy.on for c in conditions):
        return "retry"
    return None


def _final(failed: AttemptFailed) -> Opened:
    if failed.held is not None:
        return failed.held.opened()
    raise failed.error


def backoff_delay(backoff: Backoff, retry_number: int, retry_after: float | None) -> float:
    """Exponential from `base`, capped at `max`; an upstream's Retry-After wins, up to `max`."""
    if retry_after is not None:
        return min(retry_after, backoff.max)
    delay = min(backoff.max, backoff.base * 2 ** (retry_number - 1))
    return random.uniform(delay / 2, delay) if backoff.jitter else delay
