"""Active health probes for `kind: http` upstreams with a `health` block.

Every `interval`, each endpoint gets `GET {url}{path}`; `unhealthy_after` failures in a row
take it out of rotation, one success brings it back. Endpoints start in rotation, so a fresh
gateway serves at once; passive ejection (upstreams.py) covers the time before the first
probes fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from gateway.config.model import HealthConfig
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.pool import UpstreamPool

log = logging.getLogger("streamgate.health")


class HealthChecker:
    def __init__(self, pool: UpstreamPool, config: HealthConfig) -> None:
        self.pool = pool
        self.config = config
        self._failures: dict[Endpoint, int] = {ep: 0 for ep in pool.endpoints}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(ep) for ep in self.pool.endpoints))
            await asyncio.sleep(self.config.interval)

    async def _probe(self, endpoint: Endpoint) -> None:
        session = self.pool.client.session
        assert session is not None
        timeout = aiohttp.ClientTimeout(total=self.config.timeout)
        try:
            async with session.get(endpoint.url + self.config.path, timeout=timeout) as r:
                await r.read()
                ok = r.status == 200
                problem = f"answered {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            ok, problem = False, f"{type(exc).__name__}: {exc}"
        self._record(endpoint, ok, problem)

    def _record(self, endpoint: Endpoint, ok: bool, problem: str) -> None:
        if ok:
            if not endpoint.healthy:
                log.info("%s %s is healthy again", self.pool.name, endpoint.url)
            self._failures[endpoint] = 0
            endpoint.healthy = True
            return
        self._failures[endpoint] += 1
        if endpoint.healthy and self._failures[endpoint] >= self.config.unhealthy_after:
            endpoint.healthy = False
            log.warning(
                "%s %s is unhealthy after %d failed probes (%s)",
                self.pool.name,
                endpoint.url,
                self._failures[endpoint],
                problem,
            )
