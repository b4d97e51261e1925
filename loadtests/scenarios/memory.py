"""4. Proxy resident memory per open stream, with 1,000 and 5,000 slow streams.

For each level a fresh proxy is warmed up with a few hundred short streams, its RSS read,
then N slow streams (one token every two seconds) are opened and held until each has
delivered content; RSS is read again. Per stream = the difference ÷ N.
"""

from __future__ import annotations

import asyncio
import statistics

from .. import client
from ..bench import Bench
from ..proc_stats import Sampler, Usage
from ..progress import Progress
from ..results_model import Row, ScenarioResult, check, ratio
from ..targets import Target, Upstream

KEY = "memory"
TITLE = "Memory per open stream"
GOAL_KB = 24
SLOW = {"tokens": 400, "tokens_per_s": 0.5}  # 800 s: longer than any run; fake-llm draws
# every token of a completion up front, so a huge count would cost it milliseconds per request


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    result = ScenarioResult(
        KEY, TITLE,
        "Fresh proxy per level, warmed with "
        f"{s.memory_warmup_streams} short streams; then N slow streams (fake-llm "
        "`tokens_per_s: 0.5`) held open until each delivered content. (RSS with N open − "
        "RSS before) ÷ N, RSS summed over the proxy's processes.",
    )
    resources = {}
    async with bench.processes():
        upstream = await bench.upstream()
        goal_level = min(s.memory_levels)  # the goal is set at the smaller level
        for n in s.memory_levels:
            per_stream = {}
            for kind in ("gateway", "nginx") if bench.with_nginx else ("gateway",):
                target = await (bench.gateway(upstream) if kind == "gateway"
                                else bench.nginx(upstream))
                try:
                    per_stream[kind], timeline = await _measure(bench, upstream, target, n)
                finally:
                    await bench.group.stop(target.child)
                if n == max(s.memory_levels):
                    resources[kind] = timeline.series()
            kb = {k: v / 1024 for k, v in per_stream.items()}
            result.add(Row(
                f"RSS per open stream, {n:,} streams", "KiB", kb,
                ratio=ratio(kb.get("gateway"), kb.get("nginx")),
                goal=f"gateway ≤ {GOAL_KB} KiB" if n == goal_level else "",
                ok=check(kb.get("gateway"), GOAL_KB) if n == goal_level else None,
                headline=True,
            ))
    result.series["resources_memory"] = resources
    return result


async def _measure(bench: Bench, upstream: Upstream, target: Target, n: int):
    s = bench.sizes
    await bench.load(f"warm-up → {target.name}", target, {"tokens": 4}, 64,
                     s.memory_warmup_streams)
    await asyncio.sleep(0.5)
    before = await _rss(target)
    request = client.chat_request(target.host, target.port, SLOW)
    async with Sampler(target.pid, target.name) as timeline:
        async with Progress(f"open {n:,} slow streams → {target.name}", n) as progress:

            def opened() -> None:
                progress.done += 1

            conns, _ = await client.hold_open(target.host, target.port, request, n,
                                              s.timeout_s, opened)
        try:
            await asyncio.sleep(1.0)
            held = await _rss(target)
        finally:
            client.close_all(conns)
        await _upstream_idle(upstream, s.timeout_s)
    return (held - before) / n, timeline


async def _rss(target: Target) -> float:
    """The median of five readings 0.1 s apart."""
    readings = []
    for _ in range(5):
        readings.append(Usage.of(target.pid).rss)
        await asyncio.sleep(0.1)
    return statistics.median(readings)


async def _upstream_idle(upstream: Upstream, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while (await upstream.stats())["completions_active"]:
            await asyncio.sleep(0.1)
