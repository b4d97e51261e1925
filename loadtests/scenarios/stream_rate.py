"""3. Streams per second with no upstream delay, at 64 and 512 concurrent connections.

wrk (compiled, on the load core) keeps N connections busy with 16-token streams that
fake-llm sends as fast as it can. fake-llm shares the load core with wrk, so the direct
figure is the upstream's own ceiling; the proxy's CPU per stream is the figure that does
not depend on it.

Then what a second serving process buys (loadtests/scaling.py): `streamgate serve` with
`--workers 1` and with `--workers 2` (a supervisor and two serving processes on one port),
both free to run on every core, in front of an upstream that costs almost nothing per
stream: nginx answering with the same SSE body fake-llm sends (fake-llm itself, one Python
process, would be the bottleneck, and on two cores a second gateway process would only take
its CPU). They take turns in rounds; the rows give streams/s and the ratio 2÷1, gateway CPU
per stream, each process's busy time and share of the streams, the supervisor's (near 0: it
is not in the data path) and what else ran on the machine. On two cores, wrk and the
upstream take part of the second core, so 2÷1 stays below 2 even when each process keeps
its CPU per stream; a note gives the bound the cores allow.
"""

from __future__ import annotations

from .. import scaling, wrk
from ..bench import Bench
from ..proc_stats import CoreWatch, Usage
from ..results_model import Row, ScenarioResult, ratio

KEY = "stream_rate"
TITLE = "Streams per second (no upstream delay)"


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    fake = {"tokens": s.rate_tokens}
    tool = "wrk" if bench.with_wrk else "the Python client (wrk is not installed)"
    result = ScenarioResult(
        KEY, TITLE,
        f"{tool} for {s.rate_duration_s:g} s per target and level, {s.rate_tokens}-token "
        "streams, ttft 0, kept-alive connections. Proxy CPU ÷ streams completed. Then 1 vs 2 "
        "gateway processes, both free on every core, in front of nginx answering with the "
        "same SSE body (fake-llm when nginx is not installed): wrk and nginx on the load "
        f"core, {s.scale_rounds} round(s) of {s.scale_duration_s:g} s each, in turns, the "
        "median round of each.",
    )
    async with bench.processes():
        upstream = await bench.upstream()
        targets = await bench.targets(upstream)
        sse, sse_name = await scaling.sse_upstream(bench, upstream, fake)
        gateways = {v: await bench.gateway(sse, name=f"gateway-{n}", workers=n, anywhere=True)
                    for v, n in scaling.VARIANTS.items()}
        for connections in s.rate_levels:
            rates, cpu, p99, busy, beside = {}, {}, {}, {}, {}
            for target in targets:
                before = Usage.of(target.pid) if target.pid else None
                watch = CoreWatch(bench.layout.proxy)
                done, seconds, p99_s = await _drive(bench, target, connections, fake)
                rates[target.name] = done / seconds
                p99[target.name] = p99_s * 1000 if p99_s is not None else None
                if before is not None and done:
                    after = Usage.of(target.pid)
                    used, wall = after.cpu_s - before.cpu_s, after.at - before.at
                    cpu[target.name] = used / done * 1e6
                    busy[target.name] = 100 * used / wall
                    beside[target.name] = watch.shares(used, wall)
            result.add(Row(f"streams/s, {connections} concurrent", "streams/s", rates,
                           ratio=ratio(rates.get("gateway"), rates.get("nginx")), headline=True))
            result.add(Row(f"proxy CPU per stream, {connections} concurrent", "µs", cpu,
                           ratio=ratio(cpu.get("gateway"), cpu.get("nginx"))))
            result.add(Row(f"stream duration p99, {connections} concurrent", "ms", p99))
            result.add(Row(f"proxy busy, {connections} concurrent", "% of a core", busy))
            core_rows(result, f", {connections} concurrent", beside)
            await scaling.measure(bench, _drive, result, sse, sse_name, gateways, connections,
                                  fake)
    return result


def core_rows(result: ScenarioResult, suffix: str, beside: dict[str, dict[str, float]]) -> None:
    """Rows for what else used the proxy core (see proc_stats.CoreWatch), by target."""
    labels = {"others": "other processes", "irq": "kernel irq+softirq", "steal": "steal"}
    for key, label in labels.items():
        values = {t: shares[key] for t, shares in beside.items() if key in shares}
        if values and (key != "steal" or any(values.values())):
            result.add(Row(f"on the proxy core beside it: {label}{suffix}", "% of a core",
                           values))


async def _drive(bench, target, connections, fake,
                 duration_s: float | None = None) -> tuple[int, float, float | None]:
    """(streams completed, seconds, p99 stream duration in seconds); wrk runs for
    `duration_s` (default: the sizes' `rate_duration_s`)."""
    s = bench.sizes
    if bench.with_wrk:
        seconds = duration_s if duration_s is not None else s.rate_duration_s
        report = await wrk.run(bench, target, connections, seconds, fake)
        if report.errors:
            raise RuntimeError(f"wrk → {target.name}: {report.errors} errors")
        return report.requests, report.seconds, report.p99_s
    streams = int(connections * 20)
    tally = await bench.load(f"streams/s → {target.name}", target, fake, connections, streams)
    durations = sorted(tally.durations)
    return tally.ok, tally.t_end - tally.t0, durations[int(0.99 * (len(durations) - 1))]
