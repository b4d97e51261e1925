"""6. Routing cost with 10 and 1,000 routes.

Two route tables of each size, the request matching the last route: `paths` (every route its
own exact path: the router's path index should keep the cost flat) and `models` (every route
on the same prefix with its own model glob: each earlier route is tried in turn). Measured
end to end (gateway CPU per request over a fixed count of one-token streams) and in process
(`Router.match` on the same config, timed in a loop).
"""

from __future__ import annotations

import statistics
import time

from multidict import CIMultiDict

from ..bench import Bench
from ..gateway_config import ROUTE_SHAPES, gateway_yaml, routes_yaml
from ..proc_stats import Usage
from ..results_model import Row, ScenarioResult, check, percentile, ratio

KEY = "routing"
TITLE = "Routing cost"
GOAL = 2.0
FAKE = {"tokens": 1}
ROUNDS = 6


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    small, large = min(s.routing_levels), max(s.routing_levels)
    result = ScenarioResult(
        KEY, TITLE,
        f"{s.routing_requests} one-token streams per table, {s.routing_concurrency} at a "
        f"time, in {ROUNDS} rounds alternating between two gateways (the small and the large "
        "table) that run side by side; gateway CPU ÷ requests, the median round. `Router.match`: "
        f"{s.routing_match_calls} calls on the same config, in this process.",
    )
    async with bench.processes():
        upstream = await bench.upstream()
        for shape in ROUTE_SHAPES:
            sizes_, gateways, match = (small, large), {}, {}
            for n in sizes_:
                routes = routes_yaml(n, shape)
                match[n] = _time_match(gateway_yaml(upstream.url, routes=routes),
                                       s.routing_match_calls)
                gateways[n] = await bench.gateway(upstream, f"gateway-{n}", routes=routes)
                await bench.load(f"warm-up {n} routes ({shape})", gateways[n], FAKE,
                                 s.routing_concurrency, s.routing_requests // 10)
            rounds: dict[int, list[float]] = {n: [] for n in sizes_}
            durations: dict[int, list[float]] = {n: [] for n in sizes_}
            per_round = s.routing_requests // ROUNDS
            for r in range(ROUNDS):  # alternate, so drift and neighbours hit both alike
                for n in sizes_:
                    before = Usage.of(gateways[n].pid)
                    tally = await bench.load(f"{n} routes ({shape}) round {r + 1}",
                                             gateways[n], FAKE, s.routing_concurrency, per_round)
                    used = Usage.of(gateways[n].pid).cpu_s - before.cpu_s
                    rounds[n].append(used / max(tally.ok, 1))
                    durations[n].extend(tally.durations)
            for n in sizes_:
                await bench.group.stop(gateways[n].child)
            # the median round: a neighbour's burst spoils a round, not the figure
            cpu = {n: statistics.median(rounds[n]) * 1e6 for n in sizes_}
            p50 = {n: percentile(durations[n], 0.5) * 1000 for n in sizes_}
            _rows(result, shape, small, large, cpu, p50, match)
    return result


def _rows(result, shape, small, large, cpu, p50, match) -> None:
    for n in (small, large):
        grown = n == large
        result.add(Row(
            f"gateway CPU per request, {n:,} routes ({shape})", "µs", {"gateway": cpu[n]},
            ratio=ratio(cpu[n], cpu[small]) if grown else None, ratio_of=f"{small} routes",
            goal=f"≤ {GOAL:g}× {small} routes" if grown else "",
            ok=check(ratio(cpu[n], cpu[small]), GOAL) if grown else None, headline=grown,
        ))
    result.add(Row(f"request p50, {large:,} routes ({shape})", "ms", {"gateway": p50[large]},
                   ratio=ratio(p50[large], p50[small]), ratio_of=f"{small} routes"))
    result.add(Row(f"Router.match, {large:,} routes ({shape})", "µs",
                   {"gateway": match[large]}, ratio=ratio(match[large], match[small]),
                   ratio_of=f"{small} routes"))


def _time_match(yaml_text: str, calls: int) -> float:
    """Microseconds per `Router.match` for the benchmark request."""
    from gateway.config.loader import load_config_text
    from gateway.engine.routing import RequestFacts, Router

    router = Router(load_config_text(yaml_text, "bench.yaml", env={}).routes)
    headers = CIMultiDict({"Content-Type": "application/json", "Accept": "text/event-stream"})
    facts = RequestFacts("POST", "/v1/chat/completions", headers, "bench")
    assert router.match(facts) is not None
    start = time.perf_counter()
    for _ in range(calls):
        router.match(facts)
    return (time.perf_counter() - start) / calls * 1e6
