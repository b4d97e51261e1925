"""Upstream pools: endpoints, balancing policies, outlier ejection and panic, the protocol client
each, and the bound on requests in flight to the upstream.

An endpoint is in rotation for a model when it is healthy (active probes, or a worker that
passed its readiness check) and not ejected for that model by passive outlier detection
(outliers.py). Panic (Envoy's model): when fewer than `eject.panic_threshold` percent of the
endpoints are in rotation for a model, the pool balances across all of them, since sending
everything to the few left, or refusing, turns a partial fault into an outage. One exception
keeps SPEC's outage behaviour: a pool with *none* in rotation is still skipped while a later
fallback of the route has an endpoint in rotation (`last_resort` False). Entering and leaving
panic is logged once, shown in `streamgate_upstream_panic` and in /readyz.

`max_connections` bounds the requests in flight to the upstream (one connection each): a try
waits for a slot up to its route's `timeouts.queue`, then fails as `pool_exhausted`, so waiting
for the gateway's own capacity never passes for a slow backend.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gateway.config.model import HttpUpstream, WorkerPoolUpstream
from gateway.errors import PoolExhausted
from gateway.upstreams.balance import POLICIES
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.outliers import OutlierDetector

if TYPE_CHECKING:
    from gateway.observe.metrics import Metrics

log = logging.getLogger("streamgate.upstreams")

PANIC_RECHECK_S = 1.0
"""How often, at most, a pick that disagrees with the pool's panic state re-evaluates it."""


# ----------------------------------------------------------------- the pool


class UpstreamPool:
    """One upstream: its endpoints, how to choose among them, and its protocol client."""

    def __init__(
        self,
        name: str,
        config: HttpUpstream | WorkerPoolUpstream,
        endpoints: Iterable[Endpoint],
        metrics: Metrics | None = None,
        client: Callable[[UpstreamPool], Any] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.endpoints: list[Endpoint] = list(endpoints)
        self.headers = tuple(config.headers.items())
        self._policy = POLICIES[config.balance]
        self._turn = itertools.count()
        self.clients: dict[str, Any] = {}
        """Every protocol client the upstream is reached with, by protocol ("http",
        "websocket"); a client factory may add the ones that share its connections."""
        self.client = client(self) if client is not None else None
        """The protocol adapter's client for this upstream (an engine UpstreamClient: it
        sends each try and owns the connections)."""
        self.clients.setdefault("http", self.client)
        self._metrics = metrics
        self.outliers = OutlierDetector(
            name,
            config.eject,
            (lambda: None) if metrics is None else metrics.endpoint_ejections.labels(name).inc,
        )
        self._panic_threshold = config.eject.panic_threshold
        self._panic: list[str] = []
        """Why the pool is in panic, as last evaluated (empty: it is not)."""
        self._panic_checked_at = 0.0
        self._slots = asyncio.Semaphore(config.max_connections)
        self._waited = metrics.upstream_pool_wait.labels(name) if metrics is not None else None

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    # ------------------------------------------------------------- choosing an endpoint

    def in_rotation(self, endpoint: Endpoint, model: str | None, now: float) -> bool:
        return endpoint.healthy and not self.outliers.ejected(endpoint, model, now)

    def pick(
        self, tried: set[Endpoint], model: str | None = None, last_resort: bool = True
    ) -> Endpoint | None:
        """An endpoint for `model`, preferring one this request has not tried yet. In panic,
        any endpoint; with none in rotation, one only as the `last_resort` (else None)."""
        now = time.monotonic()
        ejected = self.outliers.ejected
        available = [ep for ep in self.endpoints if ep.healthy and not ejected(ep, model, now)]
        panic = len(available) * 100 < self._panic_threshold * len(self.endpoints)  # _is_panic
        if panic != bool(self._panic) and now >= self._panic_checked_at + PANIC_RECHECK_S:
            self.panic_reasons(now)
        if panic and (available or last_resort):
            candidates = self.endpoints
        elif available:
            candidates = available
        else:
            return None
        fresh = [ep for ep in candidates if ep not in tried] if tried else candidates
        return self._policy(fresh or candidates, self._turn)

    def has_endpoint_for(self, model: str | None) -> bool:
        now = time.monotonic()
        return any(self.in_rotation(ep, model, now) for ep in self.endpoints)

    def serving(self) -> bool:
        """Ready to take traffic (for /readyz): some endpoint is healthy. Ejection alone never
        makes a pool unready: it is per model, and panic keeps ejected endpoints serving."""
        return any(ep.healthy for ep in self.endpoints)

    def endpoint_in_rotation(self, endpoint: Endpoint) -> bool:
        """Healthy and not ejected for any model (for streamgate_endpoint_healthy)."""
        now = time.monotonic()
        models = self.outliers.models() or {None}
        return all(self.in_rotation(endpoint, m, now) for m in models)

    def _is_panic(self, in_rotation: int) -> bool:
        return in_rotation * 100 < self._panic_threshold * len(self.endpoints)

    def panic_reasons(self, now: float | None = None) -> list[str]:
        """Why the pool is in panic now (empty: it is not); logs entering and leaving it."""
        now = time.monotonic() if now is None else now
        self._panic_checked_at = now
        reasons = []
        for model in sorted(self.outliers.models() | {None}, key=lambda m: m or ""):
            n = sum(self.in_rotation(ep, model, now) for ep in self.endpoints)
            if self._is_panic(n):
                scope = f" for model {model!r}" if model is not None else ""
                reasons.append(
                    f"{self.name}: panic, {n} of {len(self.endpoints)} endpoints in rotation"
                    f"{scope} (panic_threshold {self._panic_threshold}%);"
                    " balancing across all of them"
                )
        if bool(reasons) != bool(self._panic):
            if reasons:
                log.warning("%s", "; ".join(reasons))
            else:
                log.info("%s: out of panic, enough endpoints in rotation again", self.name)
        self._panic = reasons
        return reasons

    # ------------------------------------------------------------- outcomes of a try

    def record_success(self, ep: Endpoint, model: str | None = None) -> None:
        self.outliers.success(ep, model, time.monotonic())

    def record_failure(self, ep: Endpoint, model: str | None = None) -> None:
        """A failure that counts toward ejection (see EjectConfig for which do)."""
        if self.outliers.failure(ep, model, time.monotonic(), self.endpoints):
            self.panic_reasons()  # an ejection may have tipped the pool into panic

    # ------------------------------------------------------------- connections

    async def acquire(self, endpoint: Endpoint, wait: float) -> None:
        """Take one of `max_connections` for a try on `endpoint`, waiting up to `wait` seconds;
        `release` gives it back. Raises PoolExhausted when none frees up in time."""
        slots = self._slots
        if slots.locked():
            started = time.monotonic()
            try:
                async with asyncio.timeout(wait):
                    await slots.acquire()
            except TimeoutError:
                self._observe_wait(time.monotonic() - started, exhausted=True)
                raise PoolExhausted(self.name, self.config.max_connections, wait) from None
            self._observe_wait(time.monotonic() - started)
        else:
            await slots.acquire()  # free: returns at once
            self._observe_wait(0.0)
        endpoint.outstanding += 1

    def release(self, endpoint: Endpoint) -> None:
        endpoint.outstanding -= 1
        self._slots.release()

    def _observe_wait(self, seconds: float, exhausted: bool = False) -> None:
        if self._waited is None:
            return
        self._waited.observe(seconds)
        if exhausted:
            self._metrics.upstream_pool_exhausted.labels(self.name).inc()

    def drop_idle_connections(self, endpoint: Endpoint) -> None:
        """Close the idle kept-alive connections to `endpoint`: its process is gone, so they
        are dead, and a request sent on one would fail for nothing."""
        self.client.drop_idle(endpoint)


def http_pool(
    name: str,
    config: HttpUpstream,
    metrics: Metrics | None = None,
    client: Callable[[UpstreamPool], Any] | None = None,
) -> UpstreamPool:
    endpoints = (Endpoint(e.url, e.weight) for e in config.endpoints)
    return UpstreamPool(name, config, endpoints, metrics, client)
