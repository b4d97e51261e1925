"""What a scenario drives: the fake-llm upstream, and three ways to reach it.

`direct` is the upstream itself (the baseline), `gateway` is streamgate in front of it, and
`nginx` is the reference C proxy in front of the same upstream, all started in the same run.

CPU layout on a two-core machine: the proxy under test (gateway or nginx) is pinned to core
0; the load generator (this process, pinned by `Bench.create`), wrk and fake-llm share
core 1. So the proxy never competes with the load it relays.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from . import nginx
from .gateway_config import gateway_yaml
from .procs import Child, ProcessGroup

GATEWAY_ANNOUNCE = re.compile(r"listening on (?P<url>http://\S+) \(admin (?P<admin>http://\S+)\)")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Layout:
    """Which cores the proxy under test and everything else run on (None: anywhere)."""

    proxy: frozenset[int] | None
    load: frozenset[int] | None
    every: frozenset[int] | None = None
    """All the cores the run may use. A child spawned with no cores of its own inherits the
    runner's, which `Bench.create` narrows to `load`: one meant to run anywhere gets these."""

    @classmethod
    def for_machine(cls, pin: bool) -> Layout:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(None, None)
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]), frozenset(cpus))


@dataclass
class Target:
    name: str
    port: int
    child: Child | None = None
    """The proxy process whose CPU and memory are measured; None for `direct`."""
    admin_url: str | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def host(self) -> str:
        return HOST


async def get_json(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        response.raise_for_status()
        return await response.json()


class Upstream:
    """A running fake-llm and its /debug/stats."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port
        self.url = f"http://{HOST}:{port}"

    async def stats(self) -> dict:
        return await get_json(self.url + "/debug/stats")

    def direct(self) -> Target:
        return Target("direct", self.port)


async def start_upstream(group: ProcessGroup, layout: Layout, *args: str) -> Upstream:
    argv = [sys.executable, "-m", "gateway", "fake-llm", "--host", HOST, "--port", "0", *args]
    child = await group.spawn("fake-llm", argv, cpus=layout.load)
    port = int(child.url.rsplit(":", 1)[1])
    return Upstream(child, port)


async def start_gateway(
    group: ProcessGroup,
    layout: Layout,
    workdir: Path,
    upstream: Upstream,
    name: str = "gateway",
    telemetry: dict | None = None,
    routes: str | None = None,
    source: Path | None = None,
    grpc_upstream: str | None = None,
    workers: int = 1,
) -> Target:
    """`python -m gateway serve` on a generated config in `workdir`, pinned to the proxy core;
    the gateway package is imported from `source` (another checkout) when given. With
    `workers` above 1 (`--workers N`: a supervisor and N serving processes) it may run on
    every core: N processes pinned to one core would only measure that core shared."""
    config = workdir / f"{name}-{upstream.port}-{len(group.children)}.yaml"
    config.write_text(gateway_yaml(upstream.url, telemetry, routes, grpc_upstream))
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
    argv += ["--workers", str(workers)] if workers > 1 else []
    cpus = layout.proxy if workers == 1 else layout.every
    child = await group.spawn(name, argv, cpus=cpus, announce=GATEWAY_ANNOUNCE,
                              start_timeout_s=60.0,
                              **({"cwd": source} if source is not None else {}))
    assert child.announced is not None
    port = int(child.url.rsplit(":", 1)[1])
    # The announcement is printed once both listeners accept: nothing more to wait for.
    return Target(name, port, child, child.announced["admin"])


async def start_nginx(
    group: ProcessGroup, layout: Layout, workdir: Path, upstream: Upstream
) -> Target:
    child, port = await nginx.start_nginx(group, workdir, upstream.port, layout.proxy)
    return Target("nginx", port, child)
