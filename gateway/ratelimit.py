"""Rate limits: one small protocol, an in-memory version (aiolimiter) per key.

A rate limit never waits: a request either has capacity now or is rejected with 429 and a
Retry-After saying when it would have. Keys come from request data (client IP, a header), so
the in-memory key space is bounded: least recently used keys are forgotten first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Protocol

from aiolimiter import AsyncLimiter
from multidict import CIMultiDictProxy

from .config import RateLimit
from .errors import RateLimited

ABSENT_HEADER_KEY = "<absent>"
"""Requests without the keyed header share one bucket under this name."""


class RateLimiter(Protocol):
    name: str
    limit: int

    def key_of(self, route: str, client_ip: str, headers: CIMultiDictProxy[str]) -> str: ...

    async def take(self, key: str) -> int:
        """Take one request from `key`'s allowance; returns what remains, or raises RateLimited."""

    def refund(self, key: str) -> None:
        """Give back what `take` took (a later limit rejected the request)."""


def key_function(key: str):
    if key == "route":
        return lambda route, client_ip, headers: route
    if key == "client_ip":
        return lambda route, client_ip, headers: client_ip
    header = key.removeprefix("header:")
    return lambda route, client_ip, headers: headers.get(header, ABSENT_HEADER_KEY)


class LocalRateLimiter:
    def __init__(self, name: str, config: RateLimit) -> None:
        self.name = name
        self.config = config
        self.limit = math.floor(config.rate)
        self.key_of = key_function(config.key)
        self._buckets: OrderedDict[str, AsyncLimiter] = OrderedDict()

    def _bucket(self, key: str) -> AsyncLimiter:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = AsyncLimiter(self.config.rate, self.config.per)
            if len(self._buckets) > self.config.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    async def take(self, key: str) -> int:
        bucket = self._bucket(key)
        if not bucket.has_capacity():
            raise RateLimited(
                f"rate limit {self.name!r} allows {self.config.rate:g} requests "
                f"per {self.config.per:g}s",
                retry_after=self._seconds_until_capacity(bucket),
                limit=self.name,
                rate=self.config.rate,
            )
        await bucket.acquire()  # has capacity: returns at once
        return max(0, math.floor(bucket.max_rate - bucket._level))

    def refund(self, key: str) -> None:
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket._level = max(0.0, bucket._level - 1)

    def _seconds_until_capacity(self, bucket: AsyncLimiter) -> float:
        # aiolimiter leaks max_rate per time_period; one request fits when level <= max_rate - 1.
        excess = bucket._level + 1 - bucket.max_rate
        return max(1.0, excess * bucket.time_period / bucket.max_rate)
