"""1. Added time to first chunk, p50 and p99, at 1 and at 64 concurrent streams.

TTFC is request written → first read holding a content delta, measured by the client. The
upstream answers at once (ttft 0), so what the proxies add is what is left over the direct
connection. Targets take turns in short rounds, so a noisy neighbour hits them all alike.
"""

from __future__ import annotations

from ..bench import Bench
from ..results_model import Row, ScenarioResult, check, percentile, ratio

KEY = "ttfc"
TITLE = "Added time to first chunk"
GOALS = {1: (0.25, 0.5), 64: (0.5, 2.0)}  # concurrency: (p50 ms, p99 ms) the gateway may add
NOISE_MS = 0.05


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    shapes = "; ".join(f"{c} concurrent: {n} streams of {k} tokens at {r:g}/s"
                       for c, n, k, r in s.ttfc_levels)
    result = ScenarioResult(
        KEY, TITLE,
        f"{shapes}; the upstream's time to first token is 0; the first requests are spread over "
        "one stream's length, so arrivals are even, not bursts. The targets take turns in "
        f"{s.ttfc_rounds} rounds; added = the target's percentile minus the direct one.",
    )
    samples: dict[str, dict[str, list[float]]] = {}
    async with bench.processes():
        upstream = await bench.upstream()
        targets = await bench.targets(upstream)
        for concurrency, streams, tokens, rate in s.ttfc_levels:
            fake = {"tokens": tokens, "tokens_per_s": rate}
            level = samples.setdefault(f"c={concurrency}", {t.name: [] for t in targets})
            per_round = max(concurrency, streams // s.ttfc_rounds)
            for r in range(s.ttfc_rounds):
                for target in targets:
                    label = f"ttfc c={concurrency} round {r + 1} → {target.name}"
                    tally = await bench.load(label, target, fake, concurrency, per_round,
                                             stagger_s=tokens / rate)
                    level[target.name].extend(tally.ttfc)
            _rows(result, concurrency, level)
    result.series["ttfc"] = samples
    return result


def _rows(result: ScenarioResult, concurrency: int, level: dict[str, list[float]]) -> None:
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        ms = {t: _ms(percentile(v, q)) for t, v in level.items()}
        result.add(Row(f"TTFC {name}, {concurrency} concurrent", "ms", ms))
        added = {t: (v - ms["direct"]) if v is not None else None
                 for t, v in ms.items() if t != "direct"}
        goal = GOALS.get(concurrency, (None, None))[0 if q == 0.5 else 1]
        nginx = added.get("nginx")
        result.add(Row(
            f"added TTFC {name}, {concurrency} concurrent", "ms", added,
            # a ratio to an addition within the noise (tens of µs) says nothing
            ratio=ratio(added.get("gateway"), nginx) if nginx and nginx >= NOISE_MS else None,
            goal=f"gateway ≤ {goal} ms" if goal else "",
            ok=check(added.get("gateway"), goal) if goal else None,
            headline=goal is not None or concurrency == 1,
        ))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
