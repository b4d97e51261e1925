"""What a second serving process buys: 1 vs 2 gateway processes in front of a near-free upstream.

fake-llm is one Python process that spends about as much CPU per stream as the gateway, so
in front of it a second gateway process only takes CPU from it (and wrk) on two cores.
Here the upstream is nginx answering every request with the same SSE body fake-llm sends
(`nginx.sse_conf`, a few µs per stream), pinned with wrk to the load cores; the gateway runs
once with `--workers 1` and once with `--workers 2`, both free to use every core. The two
take turns in rounds and each figure is the median round (by streams/s) of its variant.

Besides streams/s and the ratio 2÷1, each round records what bounds it on a shared machine:
the gateway's CPU per stream (every process of it, the supervisor included), the load's
(wrk + the upstream), and what else ran on the cores (other processes, kernel irq+softirq).
With 2 processes it also records each process's share of the streams (SO_REUSEPORT spreads
connections by a hash; wrk's connections are kept alive, so a connection's streams stay with
one process) and the supervisor's own CPU, which must stay near 0: it never accepts.
Without nginx the upstream is fake-llm and the rows say so.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from . import nginx
from .client import chat_request
from .proc_stats import CoreWatch, cpu_seconds, tree
from .results_model import Row, ScenarioResult, ratio
from .targets import Target, Upstream, get_json

VARIANTS = {"1 process": 1, "2 processes": 2}
Drive = Callable[..., Awaitable[tuple[int, float, float | None]]]
"""stream_rate's `_drive(bench, target, connections, fake)`: (streams, seconds, p99 s)."""


@dataclass
class Sample:
    rate: float
    cpu_us: float  # gateway CPU per stream, every process of it
    busy: float  # gateway, % of a core
    load_us: float  # wrk (or the client) + the upstream, CPU per stream
    load_busy: float  # the same, % of a core
    beside: dict[str, float]  # % of a core on every core: other processes, irq, steal
    processes: dict[str, float] = field(default_factory=dict)  # % of a core, by process
    shares: dict[str, float] = field(default_factory=dict)  # % of the streams, by process


async def sse_upstream(bench, fake_llm: Upstream, fake: dict) -> tuple[Upstream, str]:
    """nginx answering with what `fake_llm` answers to `fake` (fake-llm itself without nginx),
    pinned to the load cores; (the upstream, its name for the rows)."""
    if nginx.available() is None:
        return fake_llm, "fake-llm upstream"
    body = chat_request("x", 0, fake).split(b"\r\n\r\n", 1)[1]
    async with aiohttp.ClientSession() as session, session.post(
        fake_llm.url + "/v1/chat/completions", data=body,
        headers={"Content-Type": "application/json"},
    ) as response:
        response.raise_for_status()
        answer = await response.read()
    child, port = await nginx.start_sse(bench.group, bench.workdir, answer, bench.layout.load)
    return Upstream(child, port), "nginx SSE upstream"


async def measure(bench, drive: Drive, result: ScenarioResult, upstream: Upstream, name: str,
                  gateways: dict[str, Target], connections: int, fake: dict) -> None:
    """The rows for one level: `gateways` maps VARIANTS' names to running gateways."""
    done, seconds, _ = await drive(bench, upstream.direct(), connections, fake,
                                   bench.sizes.scale_duration_s)
    direct = done / seconds
    samples: dict[str, list[Sample]] = {v: [] for v in gateways}
    for _ in range(bench.sizes.scale_rounds):
        for variant, target in gateways.items():
            samples[variant].append(await _sample(bench, drive, target, upstream, connections,
                                                  fake))
    median = {v: _median(s) for v, s in samples.items()}
    one, two = median.get("1 process"), median.get("2 processes")
    c = f"{connections} concurrent, {name}"
    rates = {v: s.rate for v, s in median.items()}
    cpu = {v: s.cpu_us for v, s in median.items()}
    result.add(Row(f"streams/s, {c}", "streams/s", {"direct": direct, **rates},
                   ratio=ratio(rates.get("2 processes"), rates.get("1 process")),
                   ratio_of="1 process", headline=True))
    result.add(Row(f"gateway CPU per stream, {c}", "µs", cpu,
                   ratio=ratio(cpu.get("2 processes"), cpu.get("1 process")),
                   ratio_of="1 process"))
    result.add(Row(f"gateway busy, {c}", "% of a core", {v: s.busy for v, s in median.items()}))
    result.add(Row(f"wrk + upstream CPU per stream, {c}", "µs",
                   {v: s.load_us for v, s in median.items()}))
    for key, label in (("others", "other processes"), ("irq", "kernel irq+softirq")):
        result.add(Row(f"beside it on every core: {label}, {c}", "% of a core",
                       {v: s.beside.get(key) for v, s in median.items()}))
    if two is not None:
        result.add(Row(f"2 processes: each one busy, {c}", "% of a core", two.processes))
        result.add(Row(f"2 processes: each one's share of the streams, {c}", "%", two.shares))
    if one is not None and two is not None:
        cores = len(bench.layout.every or os.sched_getaffinity(0))
        bound = cores * 1e6 / (two.cpu_us + two.load_us)
        beside = two.beside
        idle = 100 * cores - two.busy - two.load_busy - sum(beside.values())
        result.notes.append(
            f"{c}: 2 processes ÷ 1 = {two.rate / one.rate:.2f}. At the 2-process CPU per "
            f"stream of gateway + wrk + upstream, {cores} cores allow {bound:,.0f} streams/s. "
            f"Where the {100 * cores}% went in its median round (from wrk's start to its "
            f"exit): gateway {two.busy:.0f}%, wrk + upstream {two.load_busy:.0f}%, kernel "
            f"irq+softirq {beside.get('irq', 0):.0f}%, other processes "
            f"{beside.get('others', 0):.0f}%, idle {max(0.0, idle):.0f}%"
        )


def _median(samples: list[Sample]) -> Sample:
    return sorted(samples, key=lambda s: s.rate)[(len(samples) - 1) // 2]


async def _sample(bench, drive: Drive, target: Target, upstream: Upstream, connections: int,
                  fake: dict) -> Sample:
    assert target.pid is not None and upstream.child is not None
    pids = tree(target.pid)
    children = await _process_admins(target) if len(pids) > 1 else {}
    streams0 = {i: await _streams(url) for i, (_, url) in children.items()}
    gw0 = {p: cpu_seconds([p]) for p in pids}
    up0 = cpu_seconds(tree(upstream.child.pid))
    load0 = _children_cpu() + cpu_seconds([os.getpid()])
    watch = CoreWatch(bench.layout.every or None)
    t0 = time.monotonic()
    done, seconds, _ = await drive(bench, target, connections, fake,
                                   bench.sizes.scale_duration_s)
    wall = time.monotonic() - t0
    gw = {p: cpu_seconds([p]) - gw0[p] for p in pids}
    upstream_s = cpu_seconds(tree(upstream.child.pid)) - up0
    load_s = upstream_s + _children_cpu() + cpu_seconds([os.getpid()]) - load0
    used = sum(gw.values())
    streams = {i: await _streams(url) - streams0[i] for i, (_, url) in children.items()}
    total = sum(streams.values())
    processes = {f"process {i}": 100 * gw.get(pid, 0.0) / wall
                 for i, (pid, _) in children.items()}
    if children:
        processes["supervisor"] = 100 * gw[target.pid] / wall
    return Sample(
        rate=done / seconds,
        cpu_us=used / max(done, 1) * 1e6,
        busy=100 * used / wall,
        load_us=load_s / max(done, 1) * 1e6,
        load_busy=100 * load_s / wall,
        beside=watch.shares(used + load_s, wall),
        processes=processes,
        shares={f"process {i}": 100 * n / total for i, n in streams.items()} if total else {},
    )


async def _process_admins(target: Target) -> dict[int, tuple[int, str]]:
    """index → (pid, private admin URL) of each serving process (/admin/processes)."""
    assert target.admin_url is not None
    listing = await get_json(target.admin_url + "/admin/processes")
    return {p["index"]: (p["pid"], p["admin"]) for p in listing["processes"]}


async def _streams(admin_url: str) -> float:
    """streamgate_requests_total, summed over its labels, from one process's /metrics."""
    async with aiohttp.ClientSession() as session, session.get(admin_url + "/metrics") as r:
        text = await r.text()
    return sum(s.value for family in text_string_to_metric_families(text)
               if family.name == "streamgate_requests" for s in family.samples
               if s.name == "streamgate_requests_total")


def _children_cpu() -> float:
    """CPU of this process's reaped children (wrk, once it has exited), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
