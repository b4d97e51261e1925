"""The context every scenario runs in: sizes, CPU layout, a temp dir, and its processes.

A scenario asks the `Bench` for what it needs (`upstream()`, `gateway(...)`, `nginx(...)`)
inside `async with bench.processes():`, so everything it started is stopped when it ends,
however it ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from . import client, nginx
from .procs import ProcessGroup
from .progress import Progress
from .sizes import Sizes
from .targets import Layout, Target, Upstream, start_gateway, start_nginx, start_upstream


@dataclass
class Bench:
    sizes: Sizes
    layout: Layout
    workdir: Path
    with_nginx: bool = True
    with_wrk: bool = True
    gateway_source: Path | None = None
    """Run the gateway from this checkout instead (A/B against a baseline commit)."""
    _group: ProcessGroup | None = field(default=None, repr=False)

    @classmethod
    def create(cls, sizes: Sizes, workdir: Path, pin: bool, use_nginx: bool) -> Bench:
        """A bench; with pinning, this process (the load generator) moves to the load cores."""
        layout = Layout.for_machine(pin)
        if layout.load:
            os.sched_setaffinity(0, layout.load)
        return cls(
            sizes,
            layout,
            workdir,
            with_nginx=use_nginx and nginx.available() is not None,
            with_wrk=shutil.which("wrk") is not None,
        )

    @contextlib.asynccontextmanager
    async def processes(self) -> AsyncIterator[ProcessGroup]:
        async with ProcessGroup(self.workdir) as group:
            self._group = group
            try:
                yield group
            finally:
                self._group = None

    @property
    def group(self) -> ProcessGroup:
        assert self._group is not None, "start processes inside `async with bench.processes()`"
        return self._group

    async def upstream(self, *args: str, on_proxy_core: bool = False) -> Upstream:
        layout = self.layout
        if on_proxy_core:
            layout = dataclasses.replace(layout, proxy=layout.load, load=layout.proxy)
        return await start_upstream(self.group, layout, *args)

    async def gateway(self, upstream: Upstream, name: str = "gateway", anywhere: bool = False,
                      **config) -> Target:
        """streamgate in front of `upstream`: on the proxy core, or with `anywhere` (and
        always with `workers` above 1) free on every core."""
        layout = dataclasses.replace(self.layout, proxy=self.layout.every) if anywhere else \
            self.layout
        return await start_gateway(self.group, layout, self.workdir, upstream, name,
                                   source=self.gateway_source, **config)

    async def start_gateway_with_grpc(self, upstream: Upstream, grpc_upstream: str) -> Target:
        """A gateway that also listens for gRPC and routes every call to `grpc_upstream`."""
        return await start_gateway(self.group, self.layout, self.workdir, upstream, "gateway",
                                   source=self.gateway_source, grpc_upstream=grpc_upstream)

    async def nginx(self, upstream: Upstream) -> Target:
        return await start_nginx(self.group, self.layout, self.workdir, upstream)

    async def targets(self, upstream: Upstream) -> list[Target]:
        """direct, gateway and (when installed) nginx, in front of the same upstream."""
        found = [upstream.direct(), await self.gateway(upstream)]
        if self.with_nginx:
            found.append(await self.nginx(upstream))
        return found

    async def load(
        self, label: str, target: Target, fake: dict, concurrency: int, streams: int,
        stagger_s: float = 0.0, **request: str,
    ) -> client.Tally:
        """`streams` streams through `target`, `concurrency` at a time, with a progress bar."""
        workload = client.Workload(
            label, target.host, target.port,
            client.chat_request(target.host, target.port, fake, **request),
            concurrency, streams, self.sizes.timeout_s, stagger_s,
        )
        async with Progress(label, streams) as progress:

            def tick() -> None:
                progress.done += 1

            return await client.run(workload, tick)
