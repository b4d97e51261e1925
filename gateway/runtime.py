"""Runtime: everything built from one config, swapped whole on reload.

A request takes the runtime current when it arrives and keeps it to its last byte, so streams
in flight finish under the config they started with.
"""

from __future__ import annotations

import logging

from .access_log import AccessLog
from .admission import Admission
from .config import GatewayConfig, HttpUpstream
from .context import RequestContext
from .routing import Router
from .upstreams import UpstreamPool, http_pool

log = logging.getLogger("streamgate")


class Runtime:
    def __init__(self, config: GatewayConfig, pools: dict[str, UpstreamPool]) -> None:
        self.config = config
        self.router = Router(config.routes)
        self.pools = pools
        self.admission = Admission.local(config.limits)
        self.streams: set[RequestContext] = set()
        """Requests past the commit point (for /admin/streams)."""
        self.access_log = AccessLog(config.telemetry.access_log == "json")

    @classmethod
    async def start(cls, config: GatewayConfig) -> Runtime:
        pools = {
            name: http_pool(name, upstream)
            for name, upstream in config.upstreams.items()
            if isinstance(upstream, HttpUpstream)
        }
        for pool in pools.values():
            await pool.start()
        return cls(config, pools)

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()

    def on_retry(self, ctx: RequestContext):
        def retried(reason: str) -> None:
            pass

        return retried

    def observe(self, ctx: RequestContext) -> None:
        """Called once per request, however it ended."""
        self.access_log.write(ctx)
