"""Upstream pools: endpoints, balancing policies, passive outlier ejection, one client session each.

An endpoint is in rotation when it is healthy (active probes, or a worker that passed its
readiness check) and not ejected. Ejection is passive: `eject.consecutive_failures` connect
errors, resets, pre-commit timeouts or 5xx in a row take it out for `eject.cooldown`. After
the cooldown it is tried again half-open: the failure count stays at the threshold, so one
more failure ejects it again at once, and one success resets it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar

import aiohttp

from gateway.config.model import EjectConfig, HttpUpstream, WorkerPoolUpstream


class Endpoint:
    __slots__ = (
        "url",
        "weight",
        "outstanding",
        "failures",
        "ejected_until",
        "healthy",
        "current_weight",
    )

    def __init__(self, url: str, weight: int = 1, healthy: bool = True) -> None:
        self.url = url.rstrip("/")
        """Base URL; the request's path and query are appended."""
        self.weight = weight
        self.outstanding = 0
        """Requests in flight on this endpoint (for least_outstanding)."""
        self.failures = 0
        self.ejected_until = 0.0
        self.healthy = healthy
        self.current_weight = 0
        """Smooth weighted round robin state (for weighted)."""

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now

    def in_rotation(self) -> bool:
        return self.available(time.monotonic())


# ----------------------------------------------------------------- balancing policies
# Each takes the non-empty list of candidates and the pool's turn counter.

Policy = Callable[[list[Endpoint], "itertools.count[int]"], Endpoint]


def round_robin(candidates: list[Endpoint], turn: itertools.count) -> Endpoint:
    return candidates[next(turn) % len(candidates)]


def least_outstanding(candidates: list[Endpoint], turn: itertools.count) -> Endpoint:
    # Rotate the starting point so ties do not always land on the first endpoint.
    start = next(turn) % len(candidates)
    best = candidates[start]
    for ep in itertools.chain(candidates[start + 1 :], candidates[:start]):
        if ep.outstanding < best.outstanding:
            best = ep
    return best


def weighted(candidates: list[Endpoint], turn: itertools.count) -> Endpoint:
    """Smooth weighted round robin (as nginx does): spreads picks evenly within a cycle."""
    total = 0
    best = candidates[0]
    for ep in candidates:
        ep.current_weight += ep.weight
        total += ep.weight
        if ep.current_weight > best.current_weight:
            best = ep
    best.current_weight -= total
    return best


POLICIES: dict[str, Policy] = {
    "round_robin": round_robin,
    "least_outstanding": least_outstanding,
    "weighted": weighted,
}


# ----------------------------------------------------------------- the pool


REQUEST_SENT: ContextVar[Callable[[], None] | None] = ContextVar("request_sent", default=None)
"""Set by the try in progress: called once its connection is ready, which is when its request
goes out and `timeouts.first_chunk` starts counting."""


class _Connector(aiohttp.TCPConnector):
    # A context variable read here costs far less per request than aiohttp's trace hooks.
    async def connect(self, req, traces, timeout):
        connection = await super().connect(req, traces, timeout)
        request_sent = REQUEST_SENT.get()
        if request_sent is not None:
            request_sent()
        return connection


class UpstreamPool:
    """One upstream: its endpoints, how to choose among them, and its client session."""

    def __init__(
        self,
        name: str,
        config: HttpUpstream | WorkerPoolUpstream,
        endpoints: Iterable[Endpoint],
    ) -> None:
        self.name = name
        self.config = config
        self.endpoints: list[Endpoint] = list(endpoints)
        self.headers = tuple(config.headers.items())
        self._eject: EjectConfig = config.eject
        self._policy = POLICIES[config.balance]
        self._turn = itertools.count()
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = _Connector(
            limit=self.config.max_connections,
            limit_per_host=0,
            ttl_dns_cache=60,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies are relayed byte for byte, encoding and all
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),  # every timeout is the route's
        )
        # aiohttp silently resends an idempotent request (GET, PUT, ...) once after a
        # disconnect. Retries are the route's policy, counted in retry.attempts; no others.
        self.session._retry_connection = False

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def pick(self, tried: set[Endpoint]) -> Endpoint | None:
        """An endpoint in rotation, preferring one this request has not tried yet."""
        now = time.monotonic()
        available = [ep for ep in self.endpoints if ep.available(now)]
        if not available:
            return None
        fresh = [ep for ep in available if ep not in tried] if tried else available
        return self._policy(fresh or available, self._turn)

    def any_available(self) -> bool:
        now = time.monotonic()
        return any(ep.available(now) for ep in self.endpoints)

    def record_success(self, ep: Endpoint) -> None:
        ep.failures = 0

    def record_failure(self, ep: Endpoint) -> None:
        """A failure that counts toward ejection (never a 4xx)."""
        ep.failures += 1
        if ep.failures >= self._eject.consecutive_failures:
            ep.ejected_until = time.monotonic() + self._eject.cooldown


def http_pool(name: str, config: HttpUpstream) -> UpstreamPool:
    return UpstreamPool(name, config, (Endpoint(e.url, e.weight) for e in config.endpoints))
