"""Rate limits: one small protocol, and its in-memory version (aiolimiter), one bucket per key.

A rate limit never waits: a request either has capacity now or is rejected with 429 and a
Retry-After saying when it would have. A limit of `rate` per `per` is a bucket of `rate`
requests that refills continuously (a burst of `rate`, then one every `per / rate`); the Redis
version (`redis_ratelimit.py`) keeps the same bucket shape, so moving a limit between
`scope: local` and `scope: global` changes where it is counted, not what it allows.

Keys come from request data (client IP, a header), so the in-memory key space is bounded:
least recently used keys are forgotten first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple, Protocol

from aiolimiter import AsyncLimiter
from multidict import CIMultiDictProxy

from gateway.config.model import RateLimit
from gateway.errors import RateLimited

ABSENT_HEADER_KEY = "<absent>"
"""Requests without the keyed header share one bucket under this name."""

KeyFunction = Callable[[str, str, CIMultiDictProxy[str]], str]


class Taken(NamedTuple):
    """What a successful `take` hands back."""

    remaining: int
    """Requests the key may still make at once (x-ratelimit-remaining)."""
    refund: Callable[[], None]
    """Give the request back, because a later limit rejected it; call at most once."""


class RateLimiter(Protocol):
    name: str
    limit: int
    """The burst size, reported as x-ratelimit-limit."""
    config: RateLimit
    backend: object | None
    """The shared state this limiter counts in (None: this process)."""
    key_of: KeyFunction

    async def take(self, key: str) -> Taken:
        """Take one request from `key`'s allowance now, or raise RateLimited."""
        ...


def key_function(key: str) -> KeyFunction:
    """`route`, `client_ip` or `header:NAME` → a function of (route, client_ip, headers)."""
    if key == "route":
        return lambda route, client_ip, headers: route
    if key == "client_ip":
        return lambda route, client_ip, headers: client_ip
    header = key.removeprefix("header:")
    return lambda route, client_ip, headers: headers.get(header, ABSENT_HEADER_KEY)


def bucket_shape(config: RateLimit) -> tuple[float, float]:
    """(size in requests, seconds to refill it). A bucket holds at least one request, so a
    rate below one per `per` becomes one request per the correspondingly longer period."""
    if config.rate >= 1:
        return config.rate, config.per
    return 1.0, config.per / config.rate


def rejection(name: str, config: RateLimit, retry_after_s: float) -> RateLimited:
    return RateLimited(
        f"rate limit {name!r} allows {config.rate:g} requests per {config.per:g}s",
        retry_after=max(1.0, retry_after_s),
        limit=name,
        rate=config.rate,
    )


class LocalRateLimiter:
    """In this process only: each replica counts on its own."""

    backend = None

    def __init__(self, name: str, config: RateLimit) -> None:
        self.name = name
        self.config = config
        self.limit = max(1, math.floor(config.rate))
        self.key_of = key_function(config.key)
        self._size, self._period = bucket_shape(config)
        self._buckets: OrderedDict[str, AsyncLimiter] = OrderedDict()

    async def take(self, key: str) -> Taken:
        bucket = self._bucket(key)
        if not bucket.has_capacity():
            raise rejection(self.name, self.config, self._seconds_until_capacity(bucket))
        await bucket.acquire()  # has capacity: returns without suspending
        return Taken(max(0, math.floor(bucket.max_rate - bucket._level)), partial(_refund, bucket))

    def _bucket(self, key: str) -> AsyncLimiter:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = AsyncLimiter(self._size, self._period)
            if len(self._buckets) > self.config.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    @staticmethod
    def _seconds_until_capacity(bucket: AsyncLimiter) -> float:
        # The bucket leaks max_rate per time_period; one request fits once level <= max_rate - 1.
        excess = bucket._level + 1 - bucket.max_rate
        return excess * bucket.time_period / bucket.max_rate


def _refund(bucket: AsyncLimiter) -> None:
    # aiolimiter has no public way to give capacity back; its level is the bucket's fill.
    bucket._level = max(0.0, bucket._level - 1)


def carried_over(
    configs: Mapping[str, Any],
    state: Any,
    previous: Mapping[str, Any],
    local: Callable[[str, Any], Any],
    shared: Callable[[str, Any, Any], Any],
) -> dict[str, Any]:
    """One limiter per config (rate limits and token budgets alike): one whose config and
    backend are unchanged keeps its buckets across a reload; any other is built afresh, in
    this process (`local`) or shared through Redis (`shared`) as its scope says."""
    built = {}
    for name, config in configs.items():
        backend = state if config.scope == "global" else None
        old = previous.get(name)
        if old is not None and old.backend is backend and old.config == config:
            built[name] = old
        elif backend is None:
            built[name] = local(name, config)
        else:
            built[name] = shared(name, config, backend)
    return built
