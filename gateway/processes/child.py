"""One of a supervisor's serving processes: a whole gateway on the shared port.

It differs from a lone gateway in four ways: its config comes from the supervisor's bundle
(its share of the limits, the supervisor's worker pools by URL); its proxy listener binds
with SO_REUSEPORT beside its siblings; its admin listener is private (127.0.0.1, a port the
supervisor chose), for the supervisor to ask; and it leaves the config file to the supervisor,
which watches it and asks every process to reload (`POST /admin/reload`). SIGTERM drains it as
it would a lone gateway. It writes to the supervisor's stdout and stderr directly, so its
access log lines reach the log as one JSON line each, and says where it listens on stderr (the
one "listening on" line on stdout is the supervisor's).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from gateway.app import Gateway
from gateway.config.model import GatewayConfig
from gateway.engine.runtime import Runtime
from gateway.errors import ConfigErrors
from gateway.processes.bundle import Bundle
from gateway.processes.run import configure_logging, install_event_loop_policy, run

log = logging.getLogger("streamgate.processes")


class ServingProcess(Gateway):
    watch_interval = None
    reuse_port = True

    def __init__(self, bundle_path: str, index: int, admin_port: int, bundle: Bundle) -> None:
        super().__init__(bundle_path, bundle.config(index, admin_port))
        self.index = index
        self.admin_port = admin_port
        self._worker_pools = set(bundle.worker_urls)

    def load(self) -> GatewayConfig:
        bundle = Bundle.read(self.config_path)
        config = bundle.config(self.index, self.admin_port)  # raises before anything changes
        self._worker_pools = set(bundle.worker_urls)
        return config

    async def start_runtime(
        self, config: GatewayConfig, previous: Runtime | None = None
    ) -> Runtime:
        """A worker of the supervisor's pools joins this process's rotation once its readiness
        path answers (the health checker's first probe, at once), as it joins the pool's: a
        new worker may still be loading its model. One this process already knew keeps its
        state, so a reload leaves no gap."""
        runtime = await super().start_runtime(config, previous)
        known = {} if previous is None else {
            endpoint.url: endpoint.healthy
            for pool in previous.pools.values()
            for endpoint in pool.endpoints
        }
        for name in self._worker_pools & runtime.pools.keys():
            for endpoint in runtime.pools[name].endpoints:
                endpoint.healthy = known.get(endpoint.url, False)
        return runtime


def serve_process(bundle_path: str, index: int, admin_port: int) -> int:
    configure_logging()
    try:
        gateway = ServingProcess(bundle_path, index, admin_port, Bundle.read(bundle_path))
    except ConfigErrors as errors:
        print(errors, file=sys.stderr)
        return 1
    config = gateway.config

    def announce(proxy_url: str, admin_url: str) -> None:
        pid = os.getpid()
        log.info("serving process %d, pid %d: on %s (admin %s)", index, pid, proxy_url, admin_url)

    install_event_loop_policy()
    return asyncio.run(run(gateway, announce, config.server.shutdown_grace))
