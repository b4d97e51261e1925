"""2. Proxy CPU per relayed chunk at a paced load, and what the access log costs.

512 streams of 64 chunks, one chunk every 20 ms (about 25,600 chunks/s), with the proxy
pinned to its own core and the client and fake-llm on the other. CPU is the proxy's
utime + stime over the whole load (ramp-up and the few idle ticks included), divided by the
SSE events the client received.
"""

from __future__ import annotations

import asyncio
import statistics
from array import array
from dataclasses import dataclass

from ..bench import Bench
from ..gateway_config import TELEMETRY
from ..proc_stats import CoreWatch, Sampler, Timeline, Usage
from ..results_model import Row, ScenarioResult, check, percentile, ratio
from ..targets import Target
from .stream_rate import core_rows

KEY = "cpu_per_chunk"
TITLE = "CPU per relayed chunk (paced)"
GOAL_VS_NGINX = 1.5
GOAL_ACCESS_LOG = 1.10
GOAL_STREAMS_VS_NGINX = 0.98
"""Chunks relayed in the same paced window, at least this share of nginx's."""


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    rate = s.paced_streams / s.paced_interval_s
    fake = {"tokens": s.paced_chunks, "tokens_per_s": 1 / s.paced_interval_s}
    result = ScenarioResult(
        KEY, TITLE,
        f"{s.paced_streams} concurrent streams × {s.paced_chunks} chunks, one chunk every "
        f"{s.paced_interval_s * 1000:g} ms (≈{rate:,.0f} chunks/s), {s.paced_repeats} streams "
        "per connection, the first requests spread over one stream's length; the targets take "
        f"turns in {s.paced_rounds} rounds and each figure is the median round. Proxy CPU "
        "(utime+stime from /proc) ÷ SSE events received, both over the steady state (every "
        "connection busy; set-up and wind-down left out). Metrics are always on; the gateway "
        "runs with `access_log: off` and again with `json`.",
    )
    rounds: dict[str, list[Measured]] = {}
    async with bench.processes():
        upstream = await bench.upstream()
        targets = [upstream.direct()]
        for name, telemetry in TELEMETRY.items():
            targets.append(await bench.gateway(upstream, name, telemetry=telemetry))
        if bench.with_nginx:
            targets.append(await bench.nginx(upstream))
        for r in range(s.paced_rounds):  # targets take turns: a neighbour's burst hits one round
            for target in targets:
                measured = await _measure(bench, upstream, target, fake, f" round {r + 1}",
                                          sample=r == 0)
                rounds.setdefault(target.name, []).append(measured)
    median = _medians(rounds)
    cpu, rates, load_busy = median("cpu"), median("rate"), median("load_busy")
    per_read, busy = median("per_read"), median("busy")
    beside = {t: {k: statistics.median(m.beside[k] for m in ms) for k in ms[0].beside}
              for t, ms in rounds.items() if ms[0].beside}
    gaps = {t: [g for m in ms for g in m.gaps] for t, ms in rounds.items()}
    throughput = {t: ms[0].throughput for t, ms in rounds.items()}
    resources = {t: ms[0].timeline.series() for t, ms in rounds.items() if ms[0].timeline}
    _rows(result, cpu, gaps, rates, load_busy, rate)
    result.add(Row("proxy busy, steady state", "% of a core", busy))
    result.add(Row("events per client read (coalescing)", "events", per_read))
    core_rows(result, "", beside)
    result.notes.append(
        "CPU per chunk falls when chunks coalesce (several events per read and per write, "
        "fewer syscalls), which a busy or contended proxy does by itself; the events-per-read "
        "row shows how much of that there was. Compare runs only at similar coalescing."
    )
    result.series.update(gaps=gaps, throughput=throughput, resources=resources)
    return result


@dataclass
class Measured:
    """One round of the paced load through one target."""

    cpu: float | None  # proxy CPU seconds per event received
    busy: float | None  # proxy CPU, % of a core
    rate: float | None  # events/s, steady state
    load_busy: float  # % of the load core used by the client and fake-llm
    per_read: float  # events per client read
    beside: dict[str, float]
    gaps: array
    throughput: tuple[list[float], list[float]]
    timeline: Timeline | None


async def _measure(bench: Bench, upstream, target: Target, fake: dict, label: str,
                   sample: bool) -> Measured:
    s = bench.sizes
    stream_s = s.paced_chunks * s.paced_interval_s
    # Steady state, when every connection has a stream going: from the end of the staggered
    # start to when the first connections run out of streams. Connection set-up and wind-down
    # are left out; per-stream costs (each stream's request, commit, end) are not.
    window = (stream_s, s.paced_repeats * stream_s)
    watch_task = asyncio.create_task(_window_cpu(target, window, bench.layout.proxy))
    me, up = Usage.of_self(), Usage.of(upstream.child.pid)
    try:
        async with _sampling(target if sample else None) as timeline:
            tally = await bench.load(f"paced → {target.name}{label}", target, fake,
                                     s.paced_streams, s.paced_streams * s.paced_repeats,
                                     stagger_s=stream_s)
        cpu_rate, beside = await watch_task
    finally:
        watch_task.cancel()
    rate = tally.rate_between(*window)
    me2, up2 = Usage.of_self(), Usage.of(upstream.child.pid)
    load = 100 * ((me2.cpu_s - me.cpu_s) + (up2.cpu_s - up.cpu_s)) / (me2.at - me.at)
    return Measured(
        cpu=cpu_rate / rate if cpu_rate is not None and rate else None,
        busy=100 * cpu_rate if cpu_rate is not None else None,
        rate=rate,
        load_busy=load,
        per_read=tally.events / max(tally.reads, 1),
        beside=beside,
        gaps=tally.gaps,
        throughput=tally.throughput(),
        timeline=timeline,
    )


async def _window_cpu(target: Target, window: tuple[float, float], cpus):
    """(proxy CPU seconds per second, what else ran on its core) over `window` seconds from
    now; (None, {}) for the direct target."""
    if target.pid is None:
        return None, {}
    await asyncio.sleep(window[0])
    before, watch = Usage.of(target.pid), CoreWatch(cpus)
    await asyncio.sleep(window[1] - window[0])
    after = Usage.of(target.pid)
    used, wall = after.cpu_s - before.cpu_s, after.at - before.at
    return used / wall, watch.shares(used, wall)


def _medians(rounds: dict[str, list[Measured]]):
    def median(field: str) -> dict[str, float | None]:
        found = {}
        for target, ms in rounds.items():
            values = [getattr(m, field) for m in ms if getattr(m, field) is not None]
            found[target] = statistics.median(values) if values else None
        return {t: v for t, v in found.items() if v is not None}

    return median


def _sampling(target: Target | None):
    if target is None or target.pid is None:
        return _Nothing()
    return Sampler(target.pid, target.name, interval_s=0.25)


class _Nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _rows(result, cpu, gaps, rates, load_busy, offered) -> None:
    us = {name: v * 1e6 for name, v in cpu.items()}
    gw, ng, logged = us.get("gateway"), us.get("nginx"), us.get("gateway+access_log")
    result.add(Row(
        "proxy CPU per relayed chunk", "µs", {"gateway": gw, "nginx": ng},
        ratio=ratio(gw, ng), goal=f"≤ {GOAL_VS_NGINX:g}× nginx",
        ok=check(ratio(gw, ng), GOAL_VS_NGINX) if ng else None, headline=True,
    ))
    if logged is not None:
        result.add(Row(
            "proxy CPU per chunk, access_log: json", "µs", {"gateway": logged},
            ratio=ratio(logged, gw), ratio_of="access_log off",
            goal=f"≤ {GOAL_ACCESS_LOG:.2f}× off", ok=check(ratio(logged, gw), GOAL_ACCESS_LOG),
            headline=True,
        ))
    relayed = ratio(rates.get("gateway"), rates.get("nginx"))
    result.add(Row(
        "chunks/s received, steady state", "chunks/s", dict(rates), ratio=relayed,
        goal=f"≥ {GOAL_STREAMS_VS_NGINX:g}× nginx",
        ok=None if relayed is None else relayed >= GOAL_STREAMS_VS_NGINX, headline=True,
    ))
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        values = {t: _ms(percentile(v, q)) for t, v in gaps.items()}
        result.add(Row(f"chunk gap {name}", "ms", values))
    result.add(Row("load core busy (client + fake-llm)", "% of a core", dict(load_busy)))
    worst = min((r for r in rates.values() if r is not None), default=0.0)
    if worst < 0.9 * offered:
        result.notes.append(
            f"Some targets relayed under 90% of the offered {offered:,.0f} chunks/s (lowest "
            f"{worst:,.0f}/s): a busy load core stretches the pace; CPU per chunk is still "
            "CPU ÷ chunks actually relayed."
        )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
