"""Token budget benchmark: what a token budget costs per request, and how exact a global one is.

    .venv/bin/python loadtests/bench_tokens.py [--quick]

Everything runs on 127.0.0.1 and ends on its own (about half a minute; --quick: a few seconds):

1. overhead, in process: `Admission.admit` entered and left N times with one token budget
   (reserve on entry, settle on exit), `scope: local` and `scope: global` (a private
   redis-server), sequentially and 32 at a time; microseconds per request. For `global` the
   settlement is a second script call, in the background; the 32-at-once figure waits for it.
2. accuracy, 3 replicas: three gateway processes share one global budget under load from 48
   clients. Each request reserves its estimate (prompt bytes / 4 + default_max_tokens) and the
   upstream reports a usage of its choice, so settlement moves the bucket both ways: usage
   below the estimate (refunds) and above it (debt). Tokens admitted (the usage of every
   admitted request) vs. what the budget allows over the measured window.

Needs a redis-server binary (or REDIS_URL). Shares helpers with bench_admission.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
from multidict import CIMultiDict, CIMultiDictProxy  # noqa: E402

from gateway.admission.admit import Admission  # noqa: E402
from gateway.config.loader import load_config_text  # noqa: E402
from gateway.engine.context import RequestContext  # noqa: E402
from gateway.observe.metrics import Metrics  # noqa: E402
from loadtests.bench_admission import CHAT, start_replicas, stop_replicas  # noqa: E402
from tests.conftest import chat_body, config_yaml  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.scripted_upstream import Respond, ScriptedUpstream  # noqa: E402

BODY = json.dumps(chat_body(stream=False)).encode()
DEFAULT_MAX_TOKENS = 200
ESTIMATE = len(BODY) // 4 + DEFAULT_MAX_TOKENS


def budget_top(scope: str, redis_url: str, tokens: int, per: str) -> tuple[str, str]:
    name = f"tpm-{uuid.uuid4().hex[:6]}"  # fresh Redis keys per run
    state = f"state: {{backend: redis, redis_url: '{redis_url}'}}\n" if scope == "global" else ""
    top = (
        state
        + f"limits:\n  tokens:\n    {name}: {{tokens: {tokens}, per: {per}, key: route, "
        + f"scope: {scope}, default_max_tokens: {DEFAULT_MAX_TOKENS}}}\n"
    )
    return top, f"limits: [{name}]\n"


# ----------------------------------------------------------------- 1. in process


async def admit_overhead(scope: str, redis_url: str, n: int, concurrency: int) -> dict:
    top, route = budget_top(scope, redis_url, tokens=2_000_000_000, per="1s")
    config = load_config_text(config_yaml("http://127.0.0.1:9", route=route, top=top), "b", {})
    admission = await Admission.start(config, Metrics())
    route_cfg = config.routes[0]
    headers = CIMultiDictProxy(CIMultiDict())
    loop = asyncio.get_running_loop()

    async def one() -> float:
        ctx = RequestContext("id", "POST", CHAT, "127.0.0.1", loop.time())
        ctx.body, ctx.json = BODY, json.loads(BODY)
        ctx.usage = (10, 20)  # settles to a different count than reserved: a real settle call
        started = time.perf_counter()
        async with admission.admit(ctx, route_cfg, headers):
            pass
        return time.perf_counter() - started

    async def settled() -> None:
        state = admission.shared_state
        while state is not None and state._tasks:
            await asyncio.sleep(0.001)

    try:
        for _ in range(min(200, n)):  # warm up: connections, script cache
            await one()
        await settled()
        samples = [await one() for _ in range(n)]
        await settled()
        started = time.perf_counter()
        per_worker = n // concurrency

        async def worker() -> None:
            for _ in range(per_worker):
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        await settled()
        parallel_s = time.perf_counter() - started
    finally:
        await admission.close()
    samples.sort()
    return {
        "mean_us": statistics.fmean(samples) * 1e6,
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
        "parallel_per_s": per_worker * concurrency / parallel_s,
    }


# ----------------------------------------------------------------- 2. accuracy, 3 replicas


async def budget_accuracy(redis_url: str, window_s: float, used: int, tmp: Path) -> dict:
    """A global budget of T per 10 s hammered through 3 replicas; every request uses `used`."""
    tokens, per = 60_000, 10.0
    answer = Respond(
        json={
            "choices": [{"message": {"content": "ok"}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": used - 20},
        }
    )
    async with ScriptedUpstream() as upstream:
        upstream.default = answer
        top, route = budget_top("global", redis_url, tokens, f"{per:g}s")
        replicas = await start_replicas(config_yaml(upstream.url, route=route, top=top), 3, tmp)
        admitted, rejected = [0, 0, 0], 0
        first_admit: list[float] = []
        try:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                stop_at = time.perf_counter() + window_s

                async def client(i: int) -> None:
                    nonlocal rejected
                    replica = i % 3
                    while time.perf_counter() < stop_at:
                        async with session.post(replicas[replica].url + CHAT, data=BODY) as resp:
                            await resp.read()
                        if resp.status == 200:
                            admitted[replica] += 1
                            if not first_admit:
                                first_admit.append(time.perf_counter())
                        else:
                            rejected += 1

                await asyncio.gather(*(client(i) for i in range(48)))
                elapsed = time.perf_counter() - first_admit[0]
        finally:
            await stop_replicas(replicas)
    allowed = tokens + elapsed * tokens / per
    charged = sum(admitted) * used
    return {
        "budget": f"{tokens} tokens per {per:g}s, global",
        "reserved_each": ESTIMATE,
        "used_each": used,
        "window_s": elapsed,
        "allowed": allowed,
        "charged": charged,
        "per_replica": admitted,
        "rejected": rejected,
        "error_pct": (charged - allowed) / allowed * 100,
    }


# ----------------------------------------------------------------- report


async def main(quick: bool) -> None:
    external = os.environ.get("REDIS_URL")
    server = None if external else RedisServer()
    if server is not None:
        await server.start()
    redis_url = external or server.url
    n, window_s = (300, 2.0) if quick else (3000, 6.0)
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            print(f"redis: {redis_url}   python {sys.version.split()[0]}   loop: uvloop")
            print(f"cpus: {os.cpu_count()}   load average: {os.getloadavg()[0]:.1f}\n")
            print("1. admission overhead in process (one token budget: reserve + settle)")
            print(f"   {'scope':<8}{'mean µs':>10}{'p50 µs':>10}{'p99 µs':>10}{'32 at once/s':>15}")
            for scope in ("local", "global"):
                r = await admit_overhead(scope, redis_url, n, 32)
                print(
                    f"   {scope:<8}{r['mean_us']:>10.1f}{r['p50_us']:>10.1f}"
                    f"{r['p99_us']:>10.1f}{r['parallel_per_s']:>15,.0f}"
                )
            print("\n2. one global token budget shared by 3 gateway replicas, 48 clients")
            for used in (ESTIMATE // 2, ESTIMATE, ESTIMATE * 2):
                r = await budget_accuracy(redis_url, window_s, used, Path(tmp_dir))
                print(
                    f"   {r['budget']}: reserve {r['reserved_each']}, use {r['used_each']}: "
                    f"window {r['window_s']:.2f}s, allowed {r['allowed']:.0f}, charged "
                    f"{r['charged']} {r['per_replica']}, rejected {r['rejected']}, "
                    f"error {r['error_pct']:+.2f}%"
                )
    finally:
        if server is not None:
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds, not half a minute")
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.quick))
