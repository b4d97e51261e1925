"""3. Streams per second with no upstream delay, at 64 and 512 concurrent connections.

wrk (compiled, on the load core) keeps N connections busy with 16-token streams that
fake-llm sends as fast as it can. fake-llm shares the load core with wrk, so the direct
figure is the upstream's own ceiling; the proxy's CPU per stream is the figure that does
not depend on it.

Then the same with `streamgate serve --workers 2` (a supervisor and two serving processes
on one port, free to run on every core): what a second process gives on this machine. On
two cores it shares the load core with wrk and fake-llm, so it shows the scaling this box
allows, not the scaling of a machine with a core per process.
"""

from __future__ import annotations

from .. import wrk
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
        "streams, ttft 0, kept-alive connections. Proxy CPU ÷ streams completed.",
    )
    async with bench.processes():
        upstream = await bench.upstream()
        targets = await bench.targets(upstream)
        two = await bench.gateway(upstream, name=TWO, workers=2)
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
            usage = await _usage(bench, two, connections, fake)
            _two_processes(result, f"{connections} concurrent", usage, rates)
    return result


TWO = "gateway ×2"
"""The `--workers 2` variant, in the report's `other` column."""


async def _usage(bench, target, connections, fake) -> tuple[float, float, float]:
    """(streams/s, CPU µs per stream, % of a core) of `target`'s whole process tree."""
    before = Usage.of(target.pid)
    done, seconds, _ = await _drive(bench, target, connections, fake)
    after = Usage.of(target.pid)
    used, wall = after.cpu_s - before.cpu_s, after.at - before.at
    return done / seconds, used / max(done, 1) * 1e6, 100 * used / wall


def _two_processes(result: ScenarioResult, c: str, usage: tuple[float, float, float],
                   rates: dict[str, float]) -> None:
    rate, cpu, busy = usage
    one = rates.get("gateway")
    result.add(Row(f"streams/s, {c}, --workers 2", "streams/s", {TWO: rate},
                   ratio=ratio(rate, one), ratio_of="1 process", headline=True))
    result.add(Row(f"proxy CPU per stream, {c}, --workers 2", "µs", {TWO: cpu}))
    result.add(Row(f"proxy busy, {c}, --workers 2", "% of a core", {TWO: busy}))
    against = [(n, rates.get(n)) for n in ("direct", "nginx")]
    result.notes.append(
        f"{c}: 1 process {_times(one, against)}; 2 processes {_times(rate, against)}"
    )


def _times(value: float | None, against: list[tuple[str, float | None]]) -> str:
    shown = [f"{r:.2f}× {n}" for n, b in against if (r := ratio(value, b)) is not None]
    return ", ".join(shown) or "—"


def core_rows(result: ScenarioResult, suffix: str, beside: dict[str, dict[str, float]]) -> None:
    """Rows for what else used the proxy core (see proc_stats.CoreWatch), by target."""
    labels = {"others": "other processes", "irq": "kernel irq+softirq", "steal": "steal"}
    for key, label in labels.items():
        values = {t: shares[key] for t, shares in beside.items() if key in shares}
        if values and (key != "steal" or any(values.values())):
            result.add(Row(f"on the proxy core beside it: {label}{suffix}", "% of a core",
                           values))


async def _drive(bench, target, connections, fake) -> tuple[int, float, float | None]:
    """(streams completed, seconds, p99 stream duration in seconds)."""
    s = bench.sizes
    if bench.with_wrk:
        report = await wrk.run(bench, target, connections, s.rate_duration_s, fake)
        if report.errors:
            raise RuntimeError(f"wrk → {target.name}: {report.errors} errors")
        return report.requests, report.seconds, report.p99_s
    streams = int(connections * 20)
    tally = await bench.load(f"streams/s → {target.name}", target, fake, connections, streams)
    durations = sorted(tally.durations)
    return tally.ok, tally.t_end - tally.t0, durations[int(0.99 * (len(durations) - 1))]
