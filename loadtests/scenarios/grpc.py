"""8. gRPC beside SSE through the same gateway: proxy CPU per relayed message, and how soon a
client's cancel reaches the upstream.

One gateway serves both: SSE streams to fake-llm over HTTP, and gRPC calls through its gRPC
listener to a grpc.aio upstream (`loadtests/grpc_upstream.py`) whose messages are about the
size of fake-llm's SSE events. Both loads are the same paced shape, run one after the other;
CPU is the gateway's utime + stime over each load ÷ messages (SSE events) received. Cancels:
one at a time, mid-stream; an SSE client shuts its socket (as the disconnect scenario), a
gRPC client cancels its call (RST_STREAM); the upstream notes when it saw it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

import aiohttp
from grpc import aio

from ..bench import Bench
from ..grpc_upstream import STATS, STREAM
from ..proc_stats import Usage
from ..procs import ProcessGroup
from ..progress import Progress
from ..results_model import Row, ScenarioResult, percentile, ratio
from ..targets import Layout
from .disconnect import disconnect_once as sse_cancel_latency

KEY = "grpc"
TITLE = "gRPC beside SSE: CPU per message, cancel latency"
MESSAGE_BYTES = 200  # about one fake-llm SSE event
_SEEN_WITHIN_S = 2.0


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    result = ScenarioResult(
        KEY, TITLE,
        f"{s.grpc_streams} concurrent streams × {s.grpc_messages} messages, one every "
        f"{s.grpc_interval_s * 1000:g} ms, through one gateway: SSE to fake-llm, then gRPC "
        f"calls ({MESSAGE_BYTES}-byte messages) to a grpc.aio upstream. Gateway CPU "
        "(utime+stime) over each load ÷ messages received. Then "
        f"{s.grpc_cancel_tries} cancels each, one at a time, mid-stream: latency from the "
        "client's cancel (socket shut, or RST_STREAM) to the upstream noting it.",
    )
    async with bench.processes():
        llm = await bench.upstream()
        grpc_up = await _grpc_upstream(bench.group, bench.layout)
        gateway = await bench.start_gateway_with_grpc(llm, grpc_up)
        target = re.search(r"\(grpc (\S+)\)", gateway.child.announced.string)[1]
        fake = {"tokens": s.grpc_messages, "tokens_per_s": 1 / s.grpc_interval_s}
        cpu, rate = {}, {}
        before = Usage.of(gateway.pid)
        tally = await bench.load("sse → gateway", gateway, fake, s.grpc_streams, s.grpc_streams)
        cpu["sse"], rate["sse"] = _per_message(before, Usage.of(gateway.pid), tally.events)
        before = Usage.of(gateway.pid)
        received = await _grpc_load(target, s.grpc_streams, s.grpc_messages, s.grpc_interval_s,
                                    s.timeout_s)
        cpu["grpc"], rate["grpc"] = _per_message(before, Usage.of(gateway.pid), received)
        latencies = {
            "sse": await _sse_cancels(gateway, llm, s.grpc_cancel_tries),
            "grpc": await _grpc_cancels(target, grpc_up, s.grpc_cancel_tries),
            "grpc direct": await _grpc_cancels(grpc_up, grpc_up, s.grpc_cancel_tries),
        }
    us = {k: v * 1e6 for k, v in cpu.items()}
    result.add(Row("gateway CPU per relayed message", "µs", us,
                   ratio=ratio(us.get("grpc"), us.get("sse")), ratio_of="sse", headline=True))
    result.add(Row("messages/s received (whole load)", "msg/s", rate))
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        ms = {k: percentile(v, q) * 1000 if v else None for k, v in latencies.items()}
        result.add(Row(f"cancel → upstream {name}", "ms", ms,
                       ratio=ratio(ms.get("grpc"), ms.get("sse")), ratio_of="sse",
                       headline=name == "p99"))
    result.notes.append(
        "Both loads run through the same gateway process, so their ratio is what gRPC costs "
        "over SSE here: grpc-core's HTTP/2 on both sides and a writer task per call, against "
        "aiohttp's HTTP/1.1. The `grpc direct` row is the upstream's own cancel detection."
    )
    result.series["grpc_cancel"] = latencies
    return result


def _per_message(before: Usage, after: Usage, messages: int) -> tuple[float | None, float]:
    wall = after.at - before.at
    cpu = (after.cpu_s - before.cpu_s) / messages if messages else None
    return cpu, messages / wall if wall > 0 else 0.0


async def _grpc_upstream(group: ProcessGroup, layout: Layout):
    argv = [sys.executable, "-m", "loadtests.grpc_upstream", "--port", "0"]
    child = await group.spawn("grpc-upstream", argv, cpus=layout.load)
    return child.url.removeprefix("http://")


async def _grpc_load(target: str, streams: int, messages: int, interval: float,
                     timeout_s: float) -> int:
    ask = json.dumps({"n": messages, "interval_s": interval, "size": MESSAGE_BYTES}).encode()
    received = 0
    async with aio.insecure_channel(target) as channel, Progress(
        "grpc → gateway", streams
    ) as progress:
        rpc = channel.unary_stream(STREAM)

        async def one(i: int) -> None:
            nonlocal received
            await asyncio.sleep(i * messages * interval / streams)  # spread like the SSE load
            async for _ in rpc(ask):
                received += 1
            progress.done += 1

        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(one(i) for i in range(streams)))
    return received


async def _grpc_cancels(target: str, upstream: str, tries: int) -> list[float]:
    ask = json.dumps({"n": 100_000, "interval_s": 0.02, "size": MESSAGE_BYTES}).encode()
    found = []
    async with aio.insecure_channel(target) as channel, aio.insecure_channel(
        upstream
    ) as stats_channel:
        stats = stats_channel.unary_unary(STATS)
        for _ in range(tries):
            call = channel.unary_stream(STREAM)(ask)
            await call.read()
            await call.read()  # mid-stream, not at the first message
            seen = json.loads(await stats(b""))["cancelled"]
            cancelled_at = time.monotonic()
            call.cancel()  # RST_STREAM goes out at once
            await asyncio.sleep(0.05)  # the upstream notes the time itself: no hurry to ask
            while time.monotonic() < cancelled_at + _SEEN_WITHIN_S:
                now = json.loads(await stats(b""))
                if now["cancelled"] > seen:
                    found.append(now["last_cancel_monotonic"] - cancelled_at)
                    break
                await asyncio.sleep(0.02)
    return found


async def _sse_cancels(gateway, llm, tries: int) -> list[float]:
    found = []
    async with aiohttp.ClientSession() as session:
        for _ in range(tries):
            latency = await sse_cancel_latency(gateway, llm, session)
            if latency is not None:
                found.append(latency)
    return found



