"""7. Chaos: faults stay with the request that met them.

Per-request upstream faults (503 or reset before headers, a stall before the first chunk, a cut
or a stall mid-stream, broken chunked framing) on half the requests, crossed with client
behaviours (reads all, disconnects early), through a route with a primary of two endpoints and
a fallback of one, ejection on (`consecutive_failures: 10, cooldown: 1s`, as in issue 12). The
upstreams are scripted servers in this process, answering each request by the fault its body
names (tests/support/chaos.py); the gateway runs as `streamgate serve` on the proxy core.
Invariant: at least 99% of the requests whose own upstream behaves, and whose client reads to
the end, are answered in full (admission refusals aside; this route has no limits).
"""

from __future__ import annotations

import sys

from ..bench import Bench
from ..procs import REPO_ROOT
from ..results_model import Row, ScenarioResult
from ..targets import GATEWAY_ANNOUNCE

if str(REPO_ROOT) not in sys.path:  # the scripted upstream lives with the tests
    sys.path.insert(0, str(REPO_ROOT))

from tests.support import chaos  # noqa: E402

KEY = "chaos"
TITLE = "Chaos: per-request faults stay local"
GOAL_SHARE = 0.99


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    result = ScenarioResult(
        KEY, TITLE,
        f"{s.chaos_requests} streams, {s.chaos_concurrency} at a time; half meet a fault of "
        f"their own ({', '.join(f for f in chaos.FAULTS if f != chaos.OK)}), half the clients "
        "disconnect early. Share of the well-behaved, fully read requests answered in full.",
    )
    async with bench.processes(), chaos.upstreams() as (primary, fallback):
        config = bench.workdir / "chaos.yaml"
        config.write_text(chaos.gateway_yaml(primary, fallback, first_chunk="1s", chunk_gap="1s"))
        argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config)]
        source = {"cwd": bench.gateway_source} if bench.gateway_source is not None else {}
        gateway = await bench.group.spawn("gateway", argv, cpus=bench.layout.proxy,
                                          announce=GATEWAY_ANNOUNCE, **source)
        assert gateway.url is not None
        tally = await chaos.run(gateway.url, s.chaos_requests, s.chaos_concurrency,
                                within_s=s.timeout_s)
    print(f"chaos: {tally.summary()}", flush=True)
    result.add(Row("well-behaved requests answered in full", "%",
                   {"gateway": tally.served_share * 100}, goal=f"≥ {GOAL_SHARE:.0%}",
                   ok=tally.holds(GOAL_SHARE), headline=True))
    result.add(Row("requests sent", "", {"gateway": float(tally.sent)}))
    result.add(Row("well-behaved, read to the end", "", {"gateway": float(tally.good)}))
    result.notes.append(tally.summary())
    result.notes.append("outcomes: " + ", ".join(f"{k} {v}" for k, v in
                                                  tally.outcomes.most_common()))
    return result
