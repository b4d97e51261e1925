"""Where a request's next try goes, and what the route's retry policy makes of a failed one.

Order of tries: the route's upstream, then each fallback. On each, up to `retry.attempts`
tries (the first included), preferring an endpoint this request has not tried. After a failure:
- a condition in `retry.fallback_on` moves to the next fallback at once;
- a condition in `retry.on` tries the same upstream again after backoff (an upstream
  `Retry-After` honoured up to `backoff.max`), then moves on;
- any other condition is final: an upstream's answer is relayed as sent, a connection
  failure becomes 502, a timeout 504.

One kind of failure costs no try: one that provably never reached a live server process (the
connection was refused, or a reused keep-alive connection turned out dead before any response
byte, as when a worker was killed). It is retried at once on another endpoint (or a fresh
connection), at most once per endpoint of the upstream, without consuming a `retry.attempts`
try: the operator's count is of requests an upstream could have worked on.

A hedge asks for a *fresh* try: never an endpoint this request already tried on the current
upstream, so the next fallback when the upstream has no other endpoint in rotation (or no tries
left), and no hedge when there is none. A resume asks for a fresh one first.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping

from gateway.config.routes import Backoff, Route
from gateway.engine.commit import AttemptFailed
from gateway.engine.context import RequestContext
from gateway.errors import NoHealthyUpstream
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.pool import UpstreamPool


class Try:
    """One request to one endpoint: where it went, why, and how it ended (for logs and traces)."""

    __slots__ = (
        "pool", "endpoint", "upstream", "url", "model", "hop", "why", "reason", "result", "span",
        "lost",
    )

    def __init__(
        self, pool: UpstreamPool, endpoint: Endpoint, model: str | None, hop: int
    ) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.upstream: str = pool.name
        self.url: str = endpoint.url
        self.model = model
        """The fallback's model rewrite, if any."""
        self.hop = hop
        self.why = "first"
        """first | retry | hedge | resume | splice"""
        self.reason: str | None = None
        """What led to it: the failed try's condition (retry), `slow_first_chunk` (hedge), the
        break that is being resumed (resume), `prefill_refused` (splice)."""
        self.result: str | None = None
        """ok, the status or condition it failed with, hedge_lost, or cancelled."""
        self.span = None
        self.lost = False
        """Another try won the race: this one is closed at once."""

    def again(self, why: str, reason: str) -> Try:
        """Another request to the same endpoint."""
        other = Try(self.pool, self.endpoint, self.model, self.hop)
        other.why, other.reason = why, reason
        return other


class TryOrder:
    """The cursor over a route's upstreams: which one is current, its endpoints tried, and the
    tries it has used."""

    __slots__ = (
        "ctx", "route", "hops", "index", "tried", "used", "free_left", "last_resort",
        "unavailable",
    )

    def __init__(
        self, ctx: RequestContext, route: Route, pools: Mapping[str, UpstreamPool]
    ) -> None:
        self.ctx, self.route = ctx, route
        self.hops = [(pools[route.upstream], None)]
        if route.fallbacks:
            self.hops += [(pools[f.upstream], f.model) for f in route.fallbacks]
        self.index = 0
        self.unavailable: NoHealthyUpstream | None = None
        """Set when an upstream was skipped for having no endpoint in rotation."""
        self._enter()

    def _enter(self) -> None:
        pool, _ = self.hops[self.index]
        self.tried: set[Endpoint] = set()
        self.used = 0
        self.free_left = len(pool.endpoints)
        # A pool with nothing in rotation is skipped while a later hop has something; when
        # none has, it is tried anyway if in panic (rather than refusing the request).
        later = self.hops[self.index + 1 :]
        ctx_model = self.ctx.model
        self.last_resort = not later or not any(
            p.has_endpoint_for(m or ctx_model) for p, m in later
        )

    def next(self, fresh: bool = False) -> Try | None:
        """The next try, or None when every upstream has been given up (or time is up). A
        fresh try that finds no endpoint leaves the cursor where it was, so the tries running
        meanwhile still have their retries."""
        attempts = self.route.retry.attempts
        saved = self._state() if fresh else None
        while self.index < len(self.hops):
            pool, model = self.hops[self.index]
            if self.used < attempts:
                endpoint = pool.pick(self.tried, model or self.ctx.model, self.last_resort)
                if endpoint is None:
                    message = f"upstream {pool.name!r} has no endpoint in rotation"
                    self.unavailable = self.unavailable or NoHealthyUpstream(message)
                elif not (fresh and endpoint in self.tried):
                    self.tried.add(endpoint)
                    self.used += 1
                    return Try(pool, endpoint, model, self.index)
            self.advance()
        if saved is not None:
            self.index, self.tried, self.used, self.free_left, self.last_resort = saved
        return None

    def _state(self) -> tuple:
        return self.index, self.tried, self.used, self.free_left, self.last_resort

    def advance(self) -> None:
        """Give up the current upstream for the next fallback (none once time is up)."""
        self.index += 1
        if self.index >= len(self.hops) or self.ctx.loop.time() >= self.ctx.deadline:
            self.index = len(self.hops)
        else:
            self._enter()

    def failed(self, t: Try, failed: AttemptFailed) -> str:
        """What the policy makes of a failed try: "again" (at once, costing no try: it never
        reached a server), "retry" (the same upstream after backoff), "next" (the cursor has
        moved to the next fallback), or "final" (the answer is relayed as sent)."""
        current = t.hop == self.index
        if failed.free and current and self.free_left:
            self.free_left -= 1
            self.used -= 1
            return "again"
        decision = decide(failed.conditions, self.route)
        if decision is None:
            return "final"
        if current and (decision == "fallback" or self.used >= self.route.retry.attempts):
            self.advance()
            return "next"
        return "retry"

    async def backoff(self, retry_after: float | None) -> None:
        """Sleep before the next try on the same upstream; give it up instead when the sleep
        would run past the request's deadline."""
        delay = backoff_delay(self.route.retry.backoff, max(1, self.used), retry_after)
        if self.ctx.loop.time() + delay >= self.ctx.deadline:
            self.advance()
        else:
            await asyncio.sleep(delay)


def decide(conditions: tuple[str, ...], route: Route) -> str | None:
    """ "fallback", "retry", or None when no condition is listed (the failure is final)."""
    policy = route.retry
    if any(c in policy.fallback_on for c in conditions):
        return "fallback"
    if any(c in policy.on for c in conditions):
        return "retry"
    return None


def backoff_delay(backoff: Backoff, retry_number: int, retry_after: float | None) -> float:
    """Exponential from `base`, capped at `max`; an upstream's Retry-After wins, up to `max`."""
    if retry_after is not None:
        return min(retry_after, backoff.max)
    delay = min(backoff.max, backoff.base * 2 ** (retry_number - 1))
    return random.uniform(delay / 2, delay) if backoff.jitter else delay
