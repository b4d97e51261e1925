"""Admission benchmark: what admission costs per request, and how accurate global limits are.

    .venv/bin/python loadtests/bench_admission.py [--quick]

Everything runs on 127.0.0.1 and ends on its own (about a minute; --quick: a few seconds):

1. overhead, in process: `Admission.admit` entered and left N times (one rate limit and one
   concurrency limit), with no limits, `scope: local`, and `scope: global` (a private
   redis-server), sequentially and 32 at a time; microseconds per request.
2. overhead, end to end: sequential requests through a gateway process to an upstream that
   answers at once, for the same three configs; the added latency is the difference.
3. accuracy, 3 replicas: three gateway processes share one global rate limit under load from
   many clients; admitted vs. what the limit allows over the measured window. Then one global
   concurrency limit: the most requests the upstream ever saw at once vs. the capacity.

Needs a redis-server binary (or REDIS_URL).
"""

from __future__ import annotations

import argparse
import asyncio
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
from tests.conftest import GatewayProcess, chat_body, config_yaml  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402
from tests.support.scripted_upstream import Respond, ScriptedUpstream  # noqa: E402

OK_UNARY = Respond(json={"choices": [{"message": {"content": "ok"}}]})
CHAT = "/v1/chat/completions"


def limits_top(scope: str, redis_url: str, rate: str, capacity: int, lease_ttl: str = "10s"):
    """YAML for one rate limit `rl` and one concurrency limit `cl` (or none: scope "none")."""
    if scope == "none":
        return "", ""
    suffix = uuid.uuid4().hex[:6]  # fresh Redis keys per run
    state = (
        f"state: {{backend: redis, redis_url: '{redis_url}', lease_ttl: {lease_ttl}}}\n"
        if scope == "global" else ""
    )
    top = (
        state
        + "limits:\n"
        + f"  rate:\n    rl-{suffix}: {{{rate}, key: route, scope: {scope}}}\n"
        + f"  concurrency:\n    cl-{suffix}: {{capacity: {capacity}, max_queue: 100000, "
        + f"scope: {scope}}}\n"
    )
    return top, f"limits: [rl-{suffix}, cl-{suffix}]\ntimeouts: {{queue: 60s}}\n"


# ----------------------------------------------------------------- 1. in process


async def admit_overhead(scope: str, redis_url: str, n: int, concurrency: int) -> dict:
    top, route = limits_top(scope, redis_url, "rate: 1000000000, per: 1s", capacity=1_000_000)
    config = load_config_text(config_yaml("http://127.0.0.1:9", route=route, top=top), "b", {})
    admission = await Admission.start(config, Metrics())
    route_cfg = config.routes[0]
    headers = CIMultiDictProxy(CIMultiDict())
    loop = asyncio.get_running_loop()

    async def one() -> float:
        ctx = RequestContext("id", "POST", CHAT, "127.0.0.1", loop.time())
        started = time.perf_counter()
        async with admission.admit(ctx, route_cfg, headers):
            pass
        return time.perf_counter() - started

    try:
        for _ in range(min(200, n)):  # warm up: connections, script cache
            await one()
        samples = [await one() for _ in range(n)]
        started = time.perf_counter()
        per_worker = n // concurrency

        async def worker() -> None:
            for _ in range(per_worker):
                await one()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
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


# ----------------------------------------------------------------- 2. end to end


async def start_replicas(yaml_text: str, n: int, tmp: Path) -> list[GatewayProcess]:
    path = tmp / f"gateway-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml_text)
    replicas = [GatewayProcess(path, env={"PYTHONWARNINGS": "ignore"}) for _ in range(n)]
    await asyncio.gather(*(r.start() for r in replicas))
    return replicas


async def stop_replicas(replicas: list[GatewayProcess]) -> None:
    await asyncio.gather(*(r.stop() for r in replicas))


async def http_overhead(scope: str, redis_url: str, n: int, tmp: Path) -> dict:
    async with ScriptedUpstream() as upstream:
        upstream.default = OK_UNARY
        top, route = limits_top(scope, redis_url, "rate: 1000000000, per: 1s", capacity=1_000_000)
        (gateway,) = await start_replicas(config_yaml(upstream.url, route=route, top=top), 1, tmp)
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(50):
                    await post(session, gateway.url)
                samples = []
                for _ in range(n):
                    started = time.perf_counter()
                    assert await post(session, gateway.url) == 200
                    samples.append(time.perf_counter() - started)
        finally:
            await stop_replicas([gateway])
    samples.sort()
    return {"p50_us": samples[len(samples) // 2] * 1e6, "mean_us": statistics.fmean(samples) * 1e6}


async def post(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url + CHAT, json=chat_body(stream=False)) as resp:
        await resp.read()
        return resp.status


# ----------------------------------------------------------------- 3. accuracy with 3 replicas


async def rate_accuracy(redis_url: str, window_s: float, tmp: Path) -> dict:
    """rate R per 10 s (a burst of R, then R/10 per second), hammered through 3 replicas."""
    rate, per = 300, 10.0
    async with ScriptedUpstream() as upstream:
        upstream.default = OK_UNARY
        name = f"shared-{uuid.uuid4().hex[:6]}"
        top = (
            f"state: {{backend: redis, redis_url: '{redis_url}'}}\n"
            f"limits:\n  rate:\n    {name}: {{rate: {rate}, per: {per:g}s, key: route, "
            "scope: global}\n"
        )
        cfg = config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top)
        replicas = await start_replicas(cfg, 3, tmp)
        admitted, rejected = [0, 0, 0], [0, 0, 0]
        first_admit: list[float] = []
        try:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                started = time.perf_counter()
                stop_at = started + window_s

                async def client(i: int) -> None:
                    replica = i % 3
                    while time.perf_counter() < stop_at:
                        status = await post(session, replicas[replica].url)
                        if status == 200:
                            admitted[replica] += 1
                            if not first_admit:
                                first_admit.append(time.perf_counter())
                        else:
                            rejected[replica] += 1

                await asyncio.gather(*(client(i) for i in range(48)))
                elapsed = time.perf_counter() - first_admit[0]
        finally:
            await stop_replicas(replicas)
    allowed = rate + elapsed * rate / per
    total = sum(admitted)
    return {
        "limit": f"{rate} per {per:g}s, global",
        "window_s": elapsed,
        "allowed": allowed,
        "admitted": total,
        "per_replica": admitted,
        "rejected": sum(rejected),
        "error_pct": (total - allowed) / allowed * 100,
    }


async def concurrency_accuracy(redis_url: str, requests: int, tmp: Path) -> dict:
    capacity, hold_s = 8, 0.02
    in_flight, peak, busy = 0, 0, []

    async def slow(request) -> Respond:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        busy.append(in_flight)
        await asyncio.sleep(hold_s)
        in_flight -= 1
        return OK_UNARY

    async with ScriptedUpstream() as upstream:
        upstream.default = slow
        name = f"slots-{uuid.uuid4().hex[:6]}"
        top = (
            f"state: {{backend: redis, redis_url: '{redis_url}'}}\n"
            f"limits:\n  concurrency:\n    {name}: {{capacity: {capacity}, max_queue: 100000, "
            "scope: global}\n"
        )
        route = f"limits: [{name}]\ntimeouts: {{queue: 60s}}\n"
        replicas = await start_replicas(config_yaml(upstream.url, route=route, top=top), 3, tmp)
        try:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                started = time.perf_counter()
                statuses = await asyncio.gather(
                    *(post(session, replicas[i % 3].url) for i in range(requests))
                )
                elapsed = time.perf_counter() - started
        finally:
            await stop_replicas(replicas)
    ideal_s = requests * hold_s / capacity
    return {
        "capacity": capacity,
        "peak": peak,
        "ok": statuses.count(200),
        "requests": requests,
        "elapsed_s": elapsed,
        "utilisation_pct": ideal_s / elapsed * 100,
    }


# ----------------------------------------------------------------- report


async def report_overhead(redis_url: str, n: int) -> None:
    print("1. admission overhead in process (one rate limit + one concurrency limit)")
    print(f"   {'scope':<8}{'mean µs':>10}{'p50 µs':>10}{'p99 µs':>10}{'32 at once/s':>15}")
    for scope in ("none", "local", "global"):
        r = await admit_overhead(scope, redis_url, n, 32)
        print(
            f"   {scope:<8}{r['mean_us']:>10.1f}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}"
            f"{r['parallel_per_s']:>15,.0f}"
        )


async def report_http(redis_url: str, n: int, tmp: Path) -> None:
    print("\n2. end to end through one gateway process (sequential unary requests)")
    print(f"   {'scope':<8}{'p50 µs':>10}{'mean µs':>10}{'added p50 µs':>14}")
    base = None
    for scope in ("none", "local", "global"):
        r = await http_overhead(scope, redis_url, n, tmp)
        base = base if base is not None else r["p50_us"]
        print(f"   {scope:<8}{r['p50_us']:>10.0f}{r['mean_us']:>10.0f}{r['p50_us'] - base:>14.0f}")


async def report_accuracy(redis_url: str, window_s: float, requests: int, tmp: Path) -> None:
    print("\n3. global limits shared by 3 gateway replicas")
    r = await rate_accuracy(redis_url, window_s, tmp)
    print(
        f"   rate limit {r['limit']}: window {r['window_s']:.2f}s, allowed "
        f"{r['allowed']:.1f}, admitted {r['admitted']} {r['per_replica']}, "
        f"rejected {r['rejected']}, error {r['error_pct']:+.2f}%"
    )
    r = await concurrency_accuracy(redis_url, requests, tmp)
    print(
        f"   concurrency capacity {r['capacity']}: peak in flight {r['peak']}, "
        f"{r['ok']}/{r['requests']} ok in {r['elapsed_s']:.2f}s, "
        f"utilisation {r['utilisation_pct']:.0f}% of ideal"
    )


async def main(quick: bool) -> None:
    external = os.environ.get("REDIS_URL")
    server = None if external else RedisServer()
    if server is not None:
        await server.start()
    redis_url = external or server.url
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir)
            print(f"redis: {redis_url}   python {sys.version.split()[0]}   loop: uvloop")
            print(f"cpus: {os.cpu_count()}   load average: {os.getloadavg()[0]:.1f}\n")
            await report_overhead(redis_url, 300 if quick else 3000)
            await report_http(redis_url, 200 if quick else 1000, tmp)
            await report_accuracy(redis_url, 2.0 if quick else 10.0, 120 if quick else 600, tmp)
    finally:
        if server is not None:
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds instead of a minute")
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.quick))
