"""The attempt loop: the only place tries are run, retried, failed over, hedged and resumed.

This is the only retry loop, for every protocol. Everything before the commit point is
retryable and nothing has reached the client yet; `Attempts.open` either returns an `Opened`
answer (the commit point has been reached, or a complete answer is ready to relay) or raises
the `GatewayError` the client should get. Where each try goes, and what a failure leads to, is
the route's order (`order.py`).

Tries run one after another (in the request's own task while nothing may start beside them), or
side by side as tasks when the route hedges (`hedge:`): when the newest try has sent no content
for `hedge.after`, the next try in order starts beside it (a fresh endpoint, else the next
fallback), within `hedge.max_extra` per request and the route's `HedgeBudget`. The first try to
reach its commit point wins; every other one is cancelled at once, which closes its connection
(never returned to the pool) and frees its connection slot. While tries run side by side, a
failed one only leaves its answer behind, as the others are its retry; when the last one fails,
the policy decides as for a lone try (and an answer no policy lists, left by any, is final).

After the commit point the same loop serves a resume (`Attempts.resume`, see resume.py): the
relay asks it for a fresh try to continue a broken stream, with another request body.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Mapping
from typing import Protocol

from gateway.config.routes import Route
from gateway.engine.commit import AttemptFailed, HeldResponse
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened
from gateway.engine.hedge import HedgeBudget
from gateway.engine.order import Try, TryOrder
from gateway.engine.try_once import try_once
from gateway.errors import GatewayError, NoHealthyUpstream
from gateway.observe.metrics import Metrics
from gateway.observe.tracing import NULL_TRACE
from gateway.upstreams.pool import UpstreamPool


class Ask(Protocol):
    """What a run of the loop asks each try for: the first answer, or a continuation."""

    why: str
    """How the run's first try is logged: "first" or "resume"."""
    reason: str | None
    hedged: bool
    """Whether its tries may be hedged."""

    async def attempt(self, attempts: Attempts, t: Try) -> Opened: ...


class Attempts:
    """One request's tries across the route's upstreams, and what the failed ones left."""

    __slots__ = (
        "ctx", "route", "headers", "metrics", "order", "budget", "hedges", "held", "error",
        "_started_at",
    )

    def __init__(
        self, ctx: RequestContext, route: Route, pools: Mapping[str, UpstreamPool], headers,
        metrics: Metrics, budget: HedgeBudget | None = None,
    ) -> None:
        self.ctx, self.route, self.headers, self.metrics = ctx, route, headers, metrics
        self.order = TryOrder(ctx, route, pools)
        self.budget = None
        if route.hedge is not None:  # the runtime's, shared by the route's requests
            self.budget = budget or HedgeBudget(route.hedge.budget_percent)
        self.hedges = 0
        """Hedges started for this request."""
        self.held: HeldResponse | None = None
        """The most recent complete answer of a failed try: the client's if all fail."""
        self.error: GatewayError | None = None
        self._started_at = 0.0

    async def open(self) -> Opened:
        """The answer to relay (its commit point reached), or the error the client gets."""
        if self.budget is not None:
            self.budget.request()
        opened = await self._run(_First())
        if opened is not None:
            return opened
        if self.held is not None:
            return self.held.opened()
        raise self.error or self.order.unavailable or NoHealthyUpstream("no upstream to try")

    async def resume(self, ask: Ask) -> Opened | None:
        """A fresh try's continuation of a committed stream; None when none could give one."""
        try:
            opened = await self._run(ask)
        except GatewayError:
            return None
        if opened is not None and opened.status != 200:
            opened.finish(clean=False)
            return None
        return opened

    # ------------------------------------------------------------- the loop

    async def _run(self, ask: Ask) -> Opened | None:
        """Tries until one reaches its commit point (returned), or a failure is final (its
        answer returned, or its error raised), or none is left (None)."""
        running: dict[asyncio.Task, Try] = {}
        final: AttemptFailed | None = None
        why, reason = ask.why, ask.reason
        hedge_at: float | None = None
        loop = self.ctx.loop
        try:
            while True:
                if not running:
                    if final is not None:
                        return _final(final)
                    # A resume prefers a backend other than the one that broke.
                    t = self.order.next(fresh=True) if why == "resume" else None
                    t = t or self.order.next()
                    if t is None:
                        return None
                    self._begin(t, why, reason)
                    hedge_at = self._hedge_at(ask)
                    if hedge_at is None:  # nothing may start beside it: no task, no wait
                        try:
                            return self._won(t, await ask.attempt(self, t), running)
                        except AttemptFailed as failed:
                            got = await self._after(t, failed, running, final, why, reason)
                        final, why, reason = got
                        continue
                    running[asyncio.ensure_future(ask.attempt(self, t))] = t
                timeout = None if hedge_at is None else max(0.0, hedge_at - loop.time())
                done, _ = await asyncio.wait(
                    running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    hedge_at = self._hedge(running, ask)
                    continue
                for task in [task for task in running if task in done]:
                    t = running.pop(task)
                    try:
                        opened = task.result()
                    except AttemptFailed as failed:
                        got = await self._after(t, failed, running, final, why, reason)
                        final, why, reason = got
                    else:
                        return self._won(t, opened, running)
        finally:
            if running:
                await _cancel(running)

    async def _after(self, t: Try, failed: AttemptFailed, running: dict, final, why, reason):
        """(final failure, why, reason) after `failed`: while others run it leaves its answer."""
        decision = self._failed(t, failed)
        if decision == "final":
            return failed, why, reason
        if not running and final is None:
            if decision == "retry":
                await self.order.backoff(failed.retry_after)
            return final, "retry", failed.reason
        return final, why, reason

    def _begin(self, t: Try, why: str, reason: str | None) -> None:
        t.why, t.reason = why, reason
        if why == "retry":  # a retry is a try that follows a failure
            self.metrics.child(self.metrics.retries, self.route.name, reason).inc()
            self.ctx.trace.retry(reason)
        self._started_at = self.ctx.loop.time()

    def _hedge_at(self, ask: Ask) -> float | None:
        """When to start a hedge beside the running tries, if one may be started at all."""
        policy = self.route.hedge
        if policy is None or not ask.hedged or self.hedges >= policy.max_extra:
            return None
        return self._started_at + policy.after

    def _hedge(self, running: dict, ask: Ask) -> float | None:
        """No content yet: start the next try beside the others, budget allowing."""
        metrics, rescue, route = self.metrics, self.metrics.rescue, self.route.name
        if not self.budget.room():
            metrics.child(rescue.hedges_over_budget, route).inc()
            return None
        t = self.order.next(fresh=True)
        if t is None:
            return None
        self.budget.spend()
        self.hedges += 1
        metrics.child(rescue.hedges_started, route).inc()
        self.ctx.trace.hedge(self.route.hedge.after)
        self._begin(t, "hedge", "slow_first_chunk")
        running[asyncio.ensure_future(ask.attempt(self, t))] = t
        return self._hedge_at(ask)

    def _failed(self, t: Try, failed: AttemptFailed) -> str:
        self.held = failed.held or self.held
        self.error = failed.error
        return self.order.failed(t, failed)

    def _won(self, t: Try, opened: Opened, losers: dict[asyncio.Task, Try]) -> Opened:
        self.ctx.upstream, self.ctx.endpoint = t.upstream, t.url
        if t.why == "hedge":
            self.metrics.child(self.metrics.rescue.hedges_won, self.route.name).inc()
        for loser in losers.values():
            loser.lost = True
        return opened

    # ------------------------------------------------------------- one request

    async def send(self, t: Try, body: bytes) -> Opened:
        """One request of a try, observed: its span, its attempt metric, its record."""
        ctx, metrics = self.ctx, self.metrics
        ctx.upstream, ctx.endpoint = t.upstream, t.url
        ctx.attempts += 1
        ctx.tries.append(t)
        # Each try carries its own traceparent (when tracing is on).
        headers = self.headers.copy() if ctx.trace is not NULL_TRACE else self.headers
        span = t.span = ctx.trace.attempt(t.upstream, t.url, headers, t.why, t.reason)
        model = t.model if t.model is not None else ctx.model
        try:
            opened = await try_once(ctx, self.route, t.pool, t.endpoint, body, model, headers)
        except AttemptFailed as failed:
            outcome = failed.outcome
            t.result = failed.reason
            span.failed(outcome, failed.reason, failed.held.status if failed.held else None)
            metrics.child(metrics.upstream_attempts, t.upstream, outcome).inc()
            raise
        except asyncio.CancelledError:
            t.result = "hedge_lost" if t.lost else "cancelled"
            if t.lost:
                span.abandoned("hedge_lost")
                metrics.child(metrics.upstream_attempts, t.upstream, "hedge_lost").inc()
            raise
        span.answered(opened.status)
        opened.tried = t
        t.result = "ok" if opened.status < 400 else str(opened.status)
        outcome = "ok" if opened.status < 400 else "upstream_error"
        metrics.child(metrics.upstream_attempts, t.upstream, outcome).inc()
        return opened

    def body_for(self, t: Try) -> bytes:
        """The request body as the client sent it, with the fallback's model rewrite."""
        ctx = self.ctx
        if t.model is None or ctx.json is None:
            return ctx.body
        return json.dumps({**ctx.json, "model": t.model}).encode()


class _First:
    """The request's own answer."""

    why, reason, hedged = "first", None, True

    async def attempt(self, attempts: Attempts, t: Try) -> Opened:
        return await attempts.send(t, attempts.body_for(t))


async def _cancel(running: dict[asyncio.Task, Try]) -> None:
    """Cancel the tries still running and wait until each has closed its connection. One that
    reaches its commit point anyway is closed too, even if this wait is itself cancelled."""
    for task, t in running.items():
        task.add_done_callback(functools.partial(_discard, t))
        task.cancel()
    await asyncio.wait(running)


def _discard(t: Try, task: asyncio.Task) -> None:
    if task.cancelled() or task.exception() is not None:
        return  # try_once closed the connection on its way out
    task.result().finish(clean=False)
    if t.lost:
        t.result = "hedge_lost"
        t.span.abandoned("hedge_lost")


def _final(failed: AttemptFailed) -> Opened:
    if failed.held is not None:
        return failed.held.opened()
    raise failed.error
