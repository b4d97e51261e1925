"""5. Client disconnect → upstream close, p50 and p99 over 50 tries.

Each try opens a paced stream, waits for content, then shuts the client socket down (FIN at
once) and notes time.monotonic(). fake-llm notes the moment its handler sees its client gone
(`/debug/stats` `last_client_gone_monotonic`, also CLOCK_MONOTONIC). Direct, the latency is
fake-llm's own detection; through a proxy it adds the proxy noticing and closing upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp

from .. import client
from ..bench import Bench
from ..progress import Progress
from ..results_model import Row, ScenarioResult, check, percentile, ratio
from ..targets import Target, Upstream

KEY = "disconnect"
TITLE = "Client disconnect → upstream close"
GOAL_P99_MS = 1.0
PACED = {"tokens": 2000, "tokens_per_s": 50}  # 40 s, never reached
_SEEN_WITHIN_S = 2.0


async def run(bench: Bench) -> ScenarioResult:
    tries = bench.sizes.disconnect_tries
    result = ScenarioResult(
        KEY, TITLE,
        f"{tries} tries per target, one at a time: stream at 50 tokens/s, close the client "
        "socket after content, then poll fake-llm's /debug/stats until it has seen its "
        "client go. Latency = its `last_client_gone_monotonic` − the client's close time.",
    )
    latencies: dict[str, list[float]] = {}
    missed: dict[str, int] = {}
    async with bench.processes():
        upstream = await bench.upstream()
        async with aiohttp.ClientSession() as session:
            for target in await bench.targets(upstream):
                found, lost = [], 0
                async with Progress(f"disconnects → {target.name}", tries, "tries") as progress:
                    for _ in range(tries):
                        latency = await disconnect_once(target, upstream, session)
                        if latency is None:
                            lost += 1
                        else:
                            found.append(latency)
                        progress.done += 1
                latencies[target.name], missed[target.name] = found, lost
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        ms = {t: _ms(percentile(v, q)) for t, v in latencies.items()}
        goal = name == "p99"
        result.add(Row(
            f"disconnect → upstream close {name}", "ms", ms,
            ratio=ratio(ms.get("gateway"), ms.get("nginx")),
            goal=f"gateway ≤ {GOAL_P99_MS:g} ms" if goal else "",
            ok=check(ms.get("gateway"), GOAL_P99_MS) if goal else None, headline=True,
        ))
    result.notes.append(
        "With 50 tries, p99 is the worst try. The direct row is the floor this machine allows: "
        "fake-llm's own detection, plus whatever else the shared cores were doing."
    )
    if any(missed.values()):
        result.notes.append(f"Closes not seen upstream within {_SEEN_WITHIN_S:g} s: {missed}")
    result.series["disconnect"] = latencies
    return result


HangUp = Callable[[Target, Callable[[], Awaitable[dict]]], Awaitable[tuple[float, int]]]
"""Open a paced stream through a target, wait for content, note fake-llm's `client_gone`
count (asked with the callable), close the client socket at once: (the close's monotonic
time, the count before it)."""


async def disconnect_once(
    target: Target,
    upstream: Upstream,
    session: aiohttp.ClientSession,
    hang_up: HangUp | None = None,
) -> float | None:
    """One try: seconds from the client's close to fake-llm seeing its client go (None when
    it did not within the bound). SSE unless `hang_up` says how to open and close."""
    stats_url = upstream.url + "/debug/stats"

    async def stats() -> dict:
        async with session.get(stats_url) as response:
            return await response.json()

    closed_at, before = await (hang_up or _sse_hang_up)(target, stats)
    # fake-llm notes the time itself, so there is no hurry to ask: polling at once would only
    # compete with it for the core it shares with this client.
    await asyncio.sleep(0.05)
    while time.monotonic() < closed_at + _SEEN_WITHIN_S:
        now = await stats()
        if now["client_gone"] > before:
            return now["last_client_gone_monotonic"] - closed_at
        await asyncio.sleep(0.02)
    return None


async def _sse_hang_up(target: Target, stats) -> tuple[float, int]:
    conn = await client.connect(target.host, target.port, client.Tally())
    try:
        conn.start(client.chat_request(target.host, target.port, PACED), notify_first=True)
        await asyncio.wait_for(conn.first_content(), 10)
        await asyncio.sleep(0.03)  # mid-stream, not at the first chunk
        before = (await stats())["client_gone"]
        return conn.close_now(), before
    finally:
        if conn.transport is not None:
            conn.transport.close()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
