"""Admission: rate limits, then token budgets, then weighted concurrency, each in route order.

Order is semantics here. A route's limits are charged in this fixed order:

1. every rate limit it lists, in the route's order: each takes one request now or rejects at
   once (429); no queue, so a rejected request costs nothing;
2. every token budget it lists: each reserves the request's token estimate now or rejects at
   once (429); the reservation is settled to real usage when the request ends (budgets.py);
3. every concurrency limit it lists, in the route's order: each takes the request's weight in
   units, waiting in its FIFO queue; all of them together within one `timeouts.queue`.

Whatever was taken is given back, in reverse, if a later limit rejects (or the client leaves
while queued). Units are then held until the response's last byte is written or the client is
gone, and released exactly once on every exit path; token reservations are settled there too,
in the same `finally`, so no protocol or exit path settles on its own.

`scope: local` limits live in this process (`WeightedSemaphore`, `LocalRateLimiter`);
`scope: global` ones are shared through Redis (`redis_semaphore`, `redis_ratelimit`). On a
reload, a limit that keeps its name and its scope keeps its live object, so requests in flight
release into the same semaphore and the new config's requests queue behind them; a new capacity
applies to it at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import NamedTuple, Protocol

from gateway.admission import budgets
from gateway.admission.ratelimit import LocalRateLimiter, RateLimiter, Taken, carried_over
from gateway.admission.redis_ratelimit import RedisRateLimiter
from gateway.admission.redis_semaphore import GlobalSemaphore
from gateway.admission.redis_state import RedisState
from gateway.admission.semaphore import Semaphore, WeightedSemaphore
from gateway.admission.tokens import TokenLimiter
from gateway.config.model import ConcurrencyLimit, GatewayConfig
from gateway.config.routes import Route
from gateway.errors import RateLimited
from gateway.observe.metrics import Metrics


class Admittable(budgets.Budgeted, Protocol):
    """What admission reads and writes of a request (the engine's RequestContext)."""

    client_ip: str
    stream: bool
    weight: int
    """Units the request holds (the largest weight charged), for logs."""
    rate_remaining: tuple[int, int] | None
    token_cap: int | None


class _Plan(NamedTuple):
    """What admission charges for one route, resolved once per config."""

    rates: tuple[RateLimiter, ...]
    budgets: tuple[TokenLimiter, ...]
    token_cap: int | None
    """The smallest `max_tokens_per_stream` of the budgets, for the relay to enforce."""
    slots: tuple[tuple[Semaphore, int, int], ...]
    """(semaphore, units for a stream, units for a unary request)."""


class Admission:
    def __init__(
        self,
        config: GatewayConfig,
        semaphores: Mapping[str, Semaphore],
        rate_limiters: Mapping[str, RateLimiter],
        metrics: Metrics,
        state: RedisState | None = None,
        token_limiters: Mapping[str, TokenLimiter] | None = None,
    ) -> None:
        self.semaphores = semaphores
        self.rate_limiters = rate_limiters
        self.token_limiters = token_limiters or {}
        self._limits = config.limits
        self._metrics = metrics
        self._state = state
        self._plans = {route.name: self._plan(route) for route in config.routes}

    @classmethod
    async def start(
        cls, config: GatewayConfig, metrics: Metrics, previous: Admission | None = None
    ) -> Admission:
        """Build the limits of `config`. `previous` is the admission of the config being
        replaced by a reload: limits that keep their name and scope carry their state over."""
        state = _shared_state(config, previous)
        old_semaphores = previous.semaphores if previous is not None else {}
        old_rates = previous.rate_limiters if previous is not None else {}
        semaphores: dict[str, Semaphore] = {}
        for name, limit in config.limits.concurrency.items():
            backend = state if limit.scope == "global" else None
            old = old_semaphores.get(name)
            if old is not None and old.backend is backend:
                old.resize(limit.capacity, limit.max_queue)
                semaphores[name] = old
            else:
                semaphores[name] = _semaphore(name, limit, backend, metrics)
        rate_limiters = carried_over(
            config.limits.rate, state, old_rates, LocalRateLimiter, RedisRateLimiter
        )
        old_tokens = previous.token_limiters if previous is not None else {}
        tokens = budgets.token_limiters(config.limits, state, old_tokens)
        return cls(config, semaphores, rate_limiters, metrics, state, tokens)

    @property
    def shared_state(self) -> RedisState | None:
        """The Redis state of this config's `scope: global` limits; None when none is global."""
        return self._state

    async def close(self) -> None:
        """Let go of shared state (Redis connections, lease renewals) unless the next config's
        admission still uses it."""
        if self._state is not None:
            await self._state.close()

    def _plan(self, route: Route) -> _Plan:
        rates = tuple(self.rate_limiters[n] for n in route.limits if n in self.rate_limiters)
        tokens = tuple(self.token_limiters[n] for n in route.limits if n in self.token_limiters)
        slots = tuple(
            (self.semaphores[n], limit.weights.stream, limit.weights.unary)
            for n in route.limits
            if (limit := self._limits.concurrency.get(n)) is not None and n in self.semaphores
        )
        caps = [c for b in tokens if (c := b.config.max_tokens_per_stream) is not None]
        return _Plan(rates, tokens, min(caps, default=None), slots)

    def weight(self, route: Route, stream: bool) -> int:
        """The largest weight any of the route's concurrency limits charges (for logs)."""
        plan = self._plans.get(route.name) or self._plan(route)
        return max((s if stream else u for _, s, u in plan.slots), default=0)

    def admit(
        self, ctx: Admittable, route: Route, headers: Mapping[str, str]
    ) -> AbstractAsyncContextManager[None]:
        """Hold the route's limits for the `async with` body; `headers` are the request's
        (case-insensitive), for rate limits keyed by a header. A plain object, not a
        generator: a route without limits costs one lookup."""
        plan = self._plans.get(route.name) or self._plan(route)
        if not (plan.rates or plan.budgets or plan.slots):
            return _NOTHING_HELD
        return _Held(self, ctx, route, headers, plan)

    async def _take_rates(
        self,
        ctx: Admittable,
        route: Route,
        headers: Mapping[str, str],
        limiters: tuple[RateLimiter, ...],
    ) -> list[Taken]:
        taken: list[Taken] = []
        try:
            for limiter in limiters:
                key = limiter.key_of(route.name, ctx.client_ip, headers)
                try:
                    grant = await limiter.take(key)
                except RateLimited:
                    ctx.rate_remaining = (limiter.limit, 0)
                    self._metrics.rate_limited.labels(limiter.name).inc()
                    raise
                taken.append(grant)
                if ctx.rate_remaining is None or grant.remaining < ctx.rate_remaining[1]:
                    ctx.rate_remaining = (limiter.limit, grant.remaining)
        except BaseException:
            for grant in taken:
                grant.refund()
            raise
        return taken


async def _take_units(
    ctx: Admittable, route: Route, slots: tuple[tuple[Semaphore, int, int], ...]
) -> list[tuple[Semaphore, Hashable]]:
    """Each concurrency limit in turn, all within one `timeouts.queue`; all or nothing."""
    held: list[tuple[Semaphore, Hashable]] = []
    loop = asyncio.get_running_loop()
    queue_deadline = loop.time() + route.timeouts.queue
    try:
        for semaphore, stream_units, unary_units in slots:
            units = stream_units if ctx.stream else unary_units
            timeout = max(0.0, queue_deadline - loop.time())
            held.append((semaphore, await semaphore.acquire(units, timeout)))
            ctx.weight = max(ctx.weight, units)
    except BaseException:
        _release(held)
        raise
    return held


def _release(held: list[tuple[Semaphore, Hashable]]) -> None:
    for semaphore, handle in reversed(held):
        semaphore.release(handle)


class _Held:
    """One request's hold on its route's limits: taken on entry, all or nothing; given back
    on exit, however the body ended (units released, token reservations settled)."""

    __slots__ = ("admission", "ctx", "route", "headers", "plan", "held", "charges")

    def __init__(self, admission: Admission, ctx: Admittable, route: Route,
                 headers: Mapping[str, str], plan: _Plan) -> None:
        self.admission, self.ctx, self.route, self.headers = admission, ctx, route, headers
        self.plan = plan
        self.held: list[tuple[Semaphore, Hashable]] = []
        self.charges: list[budgets.Charge] = []

    async def __aenter__(self) -> None:
        admission, ctx, route, plan = self.admission, self.ctx, self.route, self.plan
        metrics = admission._metrics.budgets
        taken = await admission._take_rates(ctx, route, self.headers, plan.rates)
        charges: list[budgets.Charge] = []
        try:
            if plan.budgets:
                charges = await budgets.reserve(ctx, route.name, self.headers, plan.budgets,
                                                metrics)
                ctx.token_cap = plan.token_cap
            self.held = await _take_units(ctx, route, plan.slots)
        except BaseException:
            budgets.settle(ctx, charges, metrics, refund=True)
            for grant in taken:
                grant.refund()
            raise
        self.charges = charges

    async def __aexit__(self, *exc_info) -> None:
        _release(self.held)
        budgets.settle(self.ctx, self.charges, self.admission._metrics.budgets)


class _NothingHeld:
    """The hold of a route without limits."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info) -> None:
        return None


_NOTHING_HELD = _NothingHeld()


def _semaphore(
    name: str, limit: ConcurrencyLimit, state: RedisState | None, metrics: Metrics
) -> Semaphore:
    def observe_wait(seconds: float) -> None:
        metrics.queue_wait.labels(name).observe(seconds)

    if state is None:
        return WeightedSemaphore(name, limit, observe_wait)
    return GlobalSemaphore(name, limit, state, observe_wait)


def _shared_state(config: GatewayConfig, previous: Admission | None) -> RedisState | None:
    """The Redis state for `config`'s global limits: the previous one when the `state` section
    did not change (its connections and leases carry over), else a new one."""
    limits = (
        *config.limits.concurrency.values(),
        *config.limits.rate.values(),
        *config.limits.tokens.values(),
    )
    if not any(limit.scope == "global" for limit in limits):
        return None
    old = previous._state if previous is not None else None
    if old is not None and old.config == config.state:
        return old.retain()
    return RedisState(config.state)
