"""Admission: rate limits first, then weighted concurrency, in the order the route lists them.

Order is semantics here. Rate limits come first so that a rejected request costs nothing and
never waits in a queue; concurrency units are then taken one limit at a time and held until
the response's last byte is written (or the client is gone). Whatever was taken is given back
if a later limit rejects, and on every exit path, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Mapping

from aiohttp import web

from .config import ConcurrencyLimit, GatewayConfig, LimitsConfig, Route
from .metrics import Metrics
from .context import RequestContext
from .errors import Overloaded, RateLimited
from .ratelimit import LocalRateLimiter, RateLimiter


class WeightedSemaphore:
    """A FIFO semaphore counted in units: a request takes its weight, waits its turn in order
    (so a heavy request at the head is never starved by a flood of light ones), and gives up
    after the route's queue timeout or when `max_queue` requests are already waiting."""

    def __init__(self, name: str, config: ConcurrencyLimit) -> None:
        self.name = name
        self.capacity = config.capacity
        self.max_queue = config.max_queue
        self.in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, units: int, timeout: float) -> None:
        if not self._waiters and self.in_use + units <= self.capacity:
            self.in_use += units
            return
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(f"concurrency limit {self.name!r} has a full queue", retry_after=1)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (units, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(units)  # granted in the same instant it gave up
            else:
                self._waiters.remove(entry)
                self._wake()  # a heavy head that left may unblock lighter requests behind it
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"waited {timeout:g}s for concurrency limit {self.name!r}",
                    retry_after=max(1.0, timeout),
                ) from None
            raise

    def release(self, units: int) -> None:
        self.in_use -= units
        self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            units, waiter = waiters[0]
            if waiter.done():  # cancelled, and about to remove itself
                waiters.popleft()
                continue
            if self.in_use + units > self.capacity:
                return
            waiters.popleft()
            self.in_use += units
            waiter.set_result(None)


class Admission:
    def __init__(
        self,
        limits: LimitsConfig,
        semaphores: Mapping[str, WeightedSemaphore],
        rate_limiters: Mapping[str, RateLimiter],
    ) -> None:
        self._limits = limits
        self.semaphores = semaphores
        self.rate_limiters = rate_limiters

    @classmethod
    async def start(
        cls, config: GatewayConfig, metrics: Metrics, previous: Admission | None = None
    ) -> Admission:
        """Build the limits of `config`. `previous` is the admission of the config being
        replaced by a reload: limits that keep their name carry their accounting over."""
        return cls.local(config.limits)

    async def close(self) -> None:
        """Let go of shared state (Redis connections, lease renewals)."""

    @classmethod
    def local(cls, limits: LimitsConfig) -> Admission:
        semaphores = {name: WeightedSemaphore(name, c) for name, c in limits.concurrency.items()}
        rate = {name: LocalRateLimiter(name, r) for name, r in limits.rate.items()}
        return cls(limits, semaphores, rate)

    def weight(self, route: Route, stream: bool) -> int:
        """The largest weight any of the route's concurrency limits charges (for logs)."""
        weights = [
            self._units(self._limits.concurrency[name], stream)
            for name in route.limits
            if name in self._limits.concurrency
        ]
        return max(weights, default=0)

    @staticmethod
    def _units(limit: ConcurrencyLimit, stream: bool) -> int:
        return limit.weights.stream if stream else limit.weights.unary

    @contextlib.asynccontextmanager
    async def admit(
        self, ctx: RequestContext, route: Route, request: web.BaseRequest
    ) -> AsyncIterator[None]:
        if not route.limits:
            yield
            return
        taken_rate = await self._check_rates(ctx, route, request)
        held: list[tuple[WeightedSemaphore, int]] = []
        try:
            loop = asyncio.get_running_loop()
            queue_deadline = loop.time() + route.timeouts.queue
            for name in route.limits:
                semaphore = self.semaphores.get(name)
                if semaphore is None:
                    continue
                units = self._units(self._limits.concurrency[name], ctx.stream)
                await semaphore.acquire(units, max(0.0, queue_deadline - loop.time()))
                held.append((semaphore, units))
                ctx.weight = max(ctx.weight, units)
        except BaseException:
            for limiter, key in taken_rate:
                limiter.refund(key)
            for semaphore, units in reversed(held):
                semaphore.release(units)
            raise
        try:
            yield
        finally:
            for semaphore, units in reversed(held):
                semaphore.release(units)

    async def _check_rates(
        self, ctx: RequestContext, route: Route, request: web.BaseRequest
    ) -> list[tuple[RateLimiter, str]]:
        taken: list[tuple[RateLimiter, str]] = []
        try:
            for name in route.limits:
                limiter = self.rate_limiters.get(name)
                if limiter is None:
                    continue
                key = limiter.key_of(route.name, ctx.client_ip, request.headers)
                try:
                    remaining = await limiter.take(key)
                except RateLimited:
                    ctx.rate_remaining = (limiter.limit, 0)
                    raise
                taken.append((limiter, key))
                ctx.rate_remaining = (
                    (limiter.limit, remaining)
                    if ctx.rate_remaining is None or remaining < ctx.rate_remaining[1]
                    else ctx.rate_remaining
                )
        except BaseException:
            for limiter, key in taken:
                limiter.refund(key)
            raise
        return taken

