"""The config one of `server.workers` serving processes runs, and the checks that make a split
possible.

In-memory state is per process, so whatever the config bounds in memory is split between the
processes, and the shares add up to the configured number: `scope: local` concurrency
(`capacity`, `max_queue`), rate limits (`rate`), token budgets (`tokens`), and each upstream's
`max_connections`. The gateway as a whole then never admits more than the config says; a
single process may refuse while another has room, since connections are spread by the kernel,
not by load. `scope: global` limits are counted in Redis, exact across processes, and are
left whole. A split that would leave a process unable to admit anything is a config error.

Worker pools are supervised once, by the supervisor process; each serving process reaches
them as a plain HTTP upstream over the workers' URLs (`worker_urls`), probing their readiness
path itself, so every process routes to the same workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType

from gateway.config.model import (
    EndpointConfig,
    GatewayConfig,
    HealthConfig,
    HttpUpstream,
    LimitsConfig,
    Upstream,
    WorkerPoolUpstream,
)
from gateway.config.rules import Problem, Problems, at_least

WORKER_PROBE_TIMEOUT_S = 2.0
"""A serving process's probe of a worker's readiness path fails past this (as the supervisor's)."""


def share(total: int, index: int, count: int) -> int:
    """Process `index`'s share of `total`: the shares of all `count` processes add up to it."""
    return total // count + (1 if index < total % count else 0)


# ----------------------------------------------------------------- checks


def check_processes(cfg: GatewayConfig) -> Problems:
    """With `server.workers` above 1, every in-memory bound must leave each process some."""
    n = cfg.server.workers
    yield from at_least("server.workers", n, 1)
    if n <= 1:
        return
    split = f"split across {n} serving processes (server.workers)"
    for name, limit in cfg.limits.concurrency.items():
        weight = max(limit.weights.stream, limit.weights.unary)
        if limit.scope == "local" and limit.capacity // n < weight:
            yield Problem(
                f"limits.concurrency.{name}.capacity",
                f"capacity {limit.capacity} is {split}: a process's share, "
                f"{limit.capacity // n}, is below the largest weight, {weight}, so some "
                f"requests could never be admitted; raise it to at least {weight * n}, "
                "or use scope: global",
            )
    for name, rate in cfg.limits.rate.items():
        if rate.scope == "local" and rate.rate < n:
            yield Problem(
                f"limits.rate.{name}.rate",
                f"rate {rate.rate:g} is {split}: a process's share is under one request "
                f"per {rate.per:g}s; raise it to at least {n}, or use scope: global",
            )
    for name, budget in cfg.limits.tokens.items():
        if budget.scope == "local" and budget.tokens < n:
            message = f"tokens {budget.tokens} is {split}: some process would get none"
            yield Problem(f"limits.tokens.{name}.tokens", message)
    for name, upstream in cfg.upstreams.items():
        if upstream.max_connections < n:
            yield Problem(
                f"upstreams.{name}.max_connections",
                f"max_connections {upstream.max_connections} is {split}: some process "
                f"could not reach the upstream; raise it to at least {n}",
            )


# ----------------------------------------------------------------- one process's config


def for_process(
    cfg: GatewayConfig,
    index: int,
    listen_port: int,
    admin_port: int,
    worker_urls: Mapping[str, Sequence[str]],
) -> GatewayConfig:
    """What serving process `index` of `cfg.server.workers` runs: the shared listen port
    (resolved by the supervisor when 0), a private admin port on 127.0.0.1, its share of
    every in-memory limit, and the supervisor's worker pools as HTTP upstreams."""
    count = cfg.server.workers
    upstreams = {
        name: _upstream(
            upstream, share(upstream.max_connections, index, count), worker_urls.get(name, ())
        )
        for name, upstream in cfg.upstreams.items()
    }
    return replace(
        cfg,
        server=replace(cfg.server, listen=(cfg.server.listen[0], listen_port)),
        admin=replace(cfg.admin, listen=("127.0.0.1", admin_port)),
        limits=_limits(cfg.limits, index, count),
        upstreams=MappingProxyType(upstreams),
    )


def _upstream(upstream: Upstream, max_connections: int, urls: Sequence[str]) -> Upstream:
    if isinstance(upstream, HttpUpstream):
        return replace(upstream, max_connections=max_connections)
    return worker_pool_as_http(upstream, urls, max_connections)


def worker_pool_as_http(
    pool: WorkerPoolUpstream, urls: Sequence[str], max_connections: int
) -> HttpUpstream:
    """A pool the supervisor runs, as one serving process reaches it: its workers' URLs,
    in rotation while their readiness path answers 200 (one failed probe takes one out)."""
    ready = pool.ready
    return HttpUpstream(
        endpoints=tuple(EndpointConfig(url) for url in urls),
        headers=pool.headers,
        balance=pool.balance,
        health=HealthConfig(ready.path, ready.interval, WORKER_PROBE_TIMEOUT_S, 1),
        eject=pool.eject,
        max_connections=max_connections,
    )


def _limits(limits: LimitsConfig, index: int, count: int) -> LimitsConfig:
    def local(table, **split):
        return MappingProxyType(
            {
                name: limit
                if limit.scope == "global"
                else replace(limit, **{k: f(getattr(limit, k)) for k, f in split.items()})
                for name, limit in table.items()
            }
        )

    def part(total: int) -> int:
        return share(total, index, count)

    return replace(
        limits,
        concurrency=local(limits.concurrency, capacity=part, max_queue=part),
        rate=local(limits.rate, rate=lambda rate: rate / count),
        tokens=local(limits.tokens, tokens=part),
    )
