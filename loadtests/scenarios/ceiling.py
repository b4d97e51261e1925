"""0. The load generator's own ceiling, against fake-llm directly.

A Python client on one core tops out somewhere near 100k chunks/s; every other scenario
must stay well under what it (and wrk) can take, or it measures the client, not the proxy.
Here fake-llm gets the proxy core to itself, the client its own core, and both are timed.
"""

from __future__ import annotations

from .. import wrk
from ..bench import Bench
from ..proc_stats import Usage
from ..results_model import Row, ScenarioResult
from ..targets import Target

KEY = "ceiling"
TITLE = "Load generator ceiling"


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    result = ScenarioResult(
        KEY, TITLE,
        f"The Python client reads {s.ceiling_concurrency} concurrent unpaced streams of "
        f"{s.ceiling_tokens} tokens straight from fake-llm (fake-llm on the proxy core, the "
        "client on the other). Unpaced, many events arrive in one read; paced, each read "
        "holds one event, so the client's ceiling is counted in reads per CPU-second. wrk "
        "does the same with 16-token streams.",
    )
    async with bench.processes():
        upstream = await bench.upstream(on_proxy_core=True)
        direct = upstream.direct()
        me, up = Usage.of_self(), Usage.of(upstream.child.pid)
        tally = await bench.load(
            "ceiling: python client → fake-llm", direct, {"tokens": s.ceiling_tokens},
            s.ceiling_concurrency, s.ceiling_streams,
        )
        me2, up2 = Usage.of_self(), Usage.of(upstream.child.pid)
        wall = me2.at - me.at
        client_cpu, upstream_cpu = me2.cpu_s - me.cpu_s, up2.cpu_s - up.cpu_s
        rate = tally.events / wall
        ceiling = tally.reads / client_cpu if client_cpu else None
        result.add(Row("python client: chunks/s achieved", "chunks/s", {"direct": rate}))
        result.add(Row("python client: reads/s achieved", "reads/s",
                       {"direct": tally.reads / wall}))
        result.add(Row("python client ceiling: reads per CPU-second", "reads/s",
                       {"direct": ceiling}, headline=True))
        result.add(Row("client / fake-llm CPU during it", "% of a core",
                       {"direct": 100 * client_cpu / wall, "upstream": 100 * upstream_cpu / wall}))
        if bench.with_wrk:
            report = await wrk.run(bench, Target("direct", upstream.port), s.ceiling_concurrency,
                                   s.rate_duration_s / 2, {"tokens": 16})
            result.add(Row("wrk: streams/s (16 tokens, 19 events)", "streams/s",
                           {"direct": report.rate}))
            result.add(Row("wrk: chunks/s", "chunks/s", {"direct": report.rate * 19}))
    if ceiling:
        paced = s.paced_streams / s.paced_interval_s
        result.notes.append(
            f"The paced scenario delivers {paced:,.0f} chunks/s, one read each: "
            f"{100 * paced / ceiling:.0f}% of the client's ceiling."
        )
    return result
