"""8. WebSocket beside SSE: proxy CPU per relayed message, and client disconnect → upstream
close, through one gateway in one run.

The same gateway process serves both: its SSE route in front of fake-llm's SSE endpoint, and
a WebSocket passthrough route in front of the same fake-llm's Inferneo-style endpoint (one
JSON request per message, one OpenAI chunk per message back). The loads are alike: as many
concurrent sessions as SSE connections, each asking for the same paced completions in turn.
They alternate in rounds, so on a shared machine both meet the same neighbours, and the
figures to read are the WebSocket ÷ SSE ratios.
"""

from __future__ import annotations

import statistics

import aiohttp

from .. import ws_client
from ..bench import Bench
from ..gateway_config import routes_yaml, with_websocket_route
from ..proc_stats import Usage
from ..progress import Progress
from ..results_model import Row, ScenarioResult, check, percentile, ratio
from ..targets import Target
from .disconnect import PACED, disconnect_once

KEY = "websocket"
TITLE = "WebSocket beside SSE"
GOAL_P99_MS = 50.0  # issue 14: the upstream sees a session's end within 50 ms, p99


async def run(bench: Bench) -> ScenarioResult:
    s = bench.sizes
    fake = {"tokens": s.ws_tokens, "tokens_per_s": 1 / s.ws_interval_s}
    result = ScenarioResult(
        KEY, TITLE,
        f"One gateway, two routes to one fake-llm: SSE, and WebSocket passthrough. CPU: "
        f"{s.ws_sessions} concurrent SSE connections, then as many WebSocket sessions, each "
        f"asking for {s.ws_repeats} completions of {s.ws_tokens} tokens at one every "
        f"{s.ws_interval_s * 1000:g} ms in turn, in {s.ws_rounds} alternating rounds (median); "
        "gateway CPU (utime+stime) over the whole load ÷ messages received (SSE events, "
        "`[DONE]` included; WebSocket messages). Disconnect: "
        f"{s.ws_disconnect_tries} tries per protocol and target, one at a time, alternating: "
        "close the client socket mid-answer, then read when fake-llm saw its client go.",
    )
    cpu: dict[str, list[float]] = {"SSE": [], "WebSocket": []}
    gone: dict[tuple[str, str], list[float]] = {}
    missed = 0
    async with bench.processes():
        upstream = await bench.upstream()
        gateway = await bench.gateway(upstream, routes=with_websocket_route(routes_yaml()))
        for r in range(s.ws_rounds):
            cpu["SSE"].append(await _sse_cpu(bench, gateway, fake, r))
            cpu["WebSocket"].append(await _ws_cpu(bench, gateway, fake, r))
        async with aiohttp.ClientSession() as http:
            ways = {"SSE": None, "WebSocket": ws_client.hang_up_with(http, PACED)}
            targets = [upstream.direct(), gateway]
            total = s.ws_disconnect_tries * len(ways) * len(targets)
            async with Progress("disconnects, SSE and WebSocket", total, "tries") as progress:
                for _ in range(s.ws_disconnect_tries):
                    for target in targets:
                        for protocol, hang_up in ways.items():
                            seen = await disconnect_once(target, upstream, http, hang_up)
                            if seen is None:
                                missed += 1
                            else:
                                gone.setdefault((protocol, target.name), []).append(seen)
                            progress.done += 1
    _cpu_rows(result, {p: statistics.median(v) for p, v in cpu.items() if v})
    _disconnect_rows(result, gone)
    if missed:
        result.notes.append(f"{missed} closes were not seen upstream within the bound.")
    result.notes.append(
        "The load client differs (raw sockets for SSE, aiohttp for WebSocket) but runs on the "
        "load core; the rows are the gateway's own CPU."
    )
    result.series["websocket_disconnect"] = {f"{p} {t}": v for (p, t), v in gone.items()}
    return result


async def _sse_cpu(bench: Bench, gateway: Target, fake: dict, r: int) -> float | None:
    s = bench.sizes
    before = Usage.of(gateway.pid)
    tally = await bench.load(f"SSE → gateway round {r + 1}", gateway, fake, s.ws_sessions,
                             s.ws_sessions * s.ws_repeats, stagger_s=_stream_s(s))
    used = Usage.of(gateway.pid).cpu_s - before.cpu_s
    return used / tally.events if tally.events else None


async def _ws_cpu(bench: Bench, gateway: Target, fake: dict, r: int) -> float | None:
    s = bench.sizes
    url = ws_client.url_of(gateway.host, gateway.port)
    before = Usage.of(gateway.pid)
    label = f"WebSocket → gateway round {r + 1}"
    async with Progress(label, s.ws_sessions * s.ws_repeats, "answers") as progress:

        def tick() -> None:
            progress.done += 1

        tally = await ws_client.run_sessions(url, fake, s.ws_sessions, s.ws_repeats,
                                             _stream_s(s), s.timeout_s, tick)
    used = Usage.of(gateway.pid).cpu_s - before.cpu_s
    if tally.errors:
        raise RuntimeError(f"{tally.errors} WebSocket sessions failed through the gateway")
    return used / tally.messages if tally.messages else None


def _stream_s(s) -> float:
    return s.ws_tokens * s.ws_interval_s


def _cpu_rows(result: ScenarioResult, per_message: dict[str, float | None]) -> None:
    sse, ws = per_message.get("SSE"), per_message.get("WebSocket")
    us = {p: v * 1e6 for p, v in per_message.items() if v is not None}
    result.add(Row("proxy CPU per relayed message, SSE", "µs", {"gateway": us.get("SSE")}))
    result.add(Row(
        "proxy CPU per relayed message, WebSocket", "µs", {"gateway": us.get("WebSocket")},
        ratio=ratio(ws, sse), ratio_of="SSE", headline=True,
    ))


def _disconnect_rows(result: ScenarioResult, gone: dict[tuple[str, str], list[float]]) -> None:
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        ms = {key: _ms(percentile(v, q)) for key, v in gone.items()}
        result.add(Row(f"disconnect → upstream close {name}, SSE", "ms",
                       {t: v for (p, t), v in ms.items() if p == "SSE"}))
        ws_gateway = ms.get(("WebSocket", "gateway"))
        goal = name == "p99"
        result.add(Row(
            f"disconnect → upstream close {name}, WebSocket", "ms",
            {t: v for (p, t), v in ms.items() if p == "WebSocket"},
            ratio=ratio(ws_gateway, ms.get(("SSE", "gateway"))), ratio_of="SSE",
            goal=f"gateway ≤ {GOAL_P99_MS:g} ms" if goal else "",
            ok=check(ws_gateway, GOAL_P99_MS) if goal else None, headline=goal,
        ))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
