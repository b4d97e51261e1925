"""Chaos: many requests, each meeting a fault of its own at the upstream, through one route.

Shared by the fast test (tests/test_chaos.py) and the load test (`python -m loadtests --only
chaos`). Every request names its own fault in the body (`"chaos": NAME`); the scripted upstreams
answer each request by that name, on whichever endpoint or fallback it lands, so a request whose
fault is `ok` is one "whose own upstream behaves". The route: a primary of two endpoints and a
fallback of one, with passive ejection on. The invariant (issue 12): at least 99% of the `ok`
requests whose client reads to the end are answered in full, admission refusals aside; the
faults of the others must not take the healthy path away from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from tests.support.scripted_upstream import (
    Close,
    NoResponse,
    Raw,
    RecordedRequest,
    ResetBeforeHeaders,
    Respond,
    ScriptedUpstream,
    Stall,
    content,
    role_delta,
    sse_tokens,
)

OK = "ok"


def _broken_framing() -> Respond:
    event = content("a ")
    return Respond(
        sse=True,
        chunked=False,
        headers={"Transfer-Encoding": "chunked"},
        chunks=[
            Raw(f"{len(role_delta()):x}\r\n".encode() + role_delta() + b"\r\n"),
            Raw(f"{len(event):x}\r\n".encode() + event + b"\r\n"),
            Raw(b"zz-not-hex\r\nboom\r\n"),
            Stall(),
        ],
    )


FAULTS: dict[str, Callable[[], object]] = {
    OK: lambda: Respond(sse=True, chunks=sse_tokens(["all ", "is ", "well "])),
    "503": lambda: Respond(status=503, json={"error": {"message": "overloaded"}}),
    "reset_before_headers": ResetBeforeHeaders,
    "stall_before_first_chunk": NoResponse,
    "cut_mid_stream": lambda: Respond(sse=True, chunks=[role_delta(), content("a "), Close()]),
    "stall_mid_stream": lambda: Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]),
    "broken_chunked_framing": _broken_framing,
}
BEHAVIOURS = ("reads_all", "disconnects_early")
MODELS = ("m0", "m1", "m2")


def answer(request: RecordedRequest) -> object:
    """The scripted upstreams' handler: the fault the request names."""
    return FAULTS[request.json()["chaos"]]()


@contextlib.asynccontextmanager
async def upstreams():
    """Two primary endpoints and one fallback, each answering by the request's fault."""
    async with ScriptedUpstream() as a, ScriptedUpstream() as b, ScriptedUpstream() as c:
        for up in (a, b, c):
            up.default = answer
        yield [a.url, b.url], c.url


def gateway_yaml(
    primary: list[str],
    fallback: str,
    consecutive_failures: int = 10,
    first_chunk: str = "300ms",
    chunk_gap: str = "300ms",
) -> str:
    endpoints = ", ".join(f'{{url: "{u}"}}' for u in primary)
    eject = f"{{consecutive_failures: {consecutive_failures}, cooldown: 1s}}"
    return (
        "server: {listen: 127.0.0.1:0, shutdown_grace: 1s}\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "telemetry: {access_log: off}\n"
        "upstreams:\n"
        f"  primary: {{kind: http, endpoints: [{endpoints}], eject: {eject}}}\n"
        f'  backup: {{kind: http, endpoints: [{{url: "{fallback}"}}], eject: {eject}}}\n'
        "routes:\n"
        "  - name: chaos\n"
        "    upstream: primary\n"
        "    fallbacks: [backup]\n"
        "    match: {path_prefix: /}\n"
        f"    timeouts: {{first_chunk: {first_chunk}, chunk_gap: {chunk_gap}, total: 20s}}\n"
        "    retry: {attempts: 2, backoff: {base: 1ms, max: 10ms}}\n"
    )


@dataclass
class Tally:
    sent: int = 0
    good: int = 0
    """Requests whose own upstream behaves and whose client reads to the end."""
    good_served: int = 0
    good_refused: int = 0
    """Admission refusals (overloaded, rate limited): outside the invariant."""
    good_failures: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def served_share(self) -> float:
        counted = self.good - self.good_refused
        return self.good_served / counted if counted else 1.0

    def holds(self, share: float = 0.99) -> bool:
        return self.served_share >= share

    def summary(self) -> str:
        failures = ", ".join(f"{k}: {v}" for k, v in self.good_failures.most_common()) or "none"
        return (
            f"{self.sent} requests in {self.seconds:.1f}s; {self.good} behave and read all: "
            f"{self.good_served} answered in full ({self.served_share:.1%}), "
            f"{self.good_refused} refused by admission; failures of those: {failures}"
        )


def plan(count: int, seed: int, fault_share: float = 0.5) -> list[tuple[str, str, str]]:
    """(fault, behaviour, model) per request: `fault_share` of them meet a fault."""
    rng = random.Random(seed)
    faults = [f for f in FAULTS if f != OK]
    return [
        (
            rng.choice(faults) if rng.random() < fault_share else OK,
            rng.choice(BEHAVIOURS),
            rng.choice(MODELS),
        )
        for _ in range(count)
    ]


async def run(
    url: str, count: int, concurrency: int, seed: int = 12, within_s: float = 120
) -> Tally:
    """Send the planned requests to the gateway at `url`, `concurrency` at a time."""
    tally = Tally()
    todo = iter(plan(count, seed))
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    # A connection per request: after an SSE error event the gateway ends the chunked body and
    # closes, and a pooled client connection reused in that instant fails on the client's side
    # (a keep-alive race that is not the upstream fault under test).
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            for fault, behaviour, model in todo:
                await _one(session, url, fault, behaviour, model, tally)

        async with asyncio.timeout(within_s):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.seconds = time.monotonic() - started
    return tally


async def _one(
    session: aiohttp.ClientSession, url: str, fault: str, behaviour: str, model: str, tally: Tally
) -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    body["chaos"] = fault
    tally.sent += 1
    good = fault == OK and behaviour == "reads_all"
    tally.good += good
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            if behaviour == "disconnects_early":
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with asyncio.timeout(1):
                        await response.content.readany()
                response.close()
                tally.outcomes["disconnected"] += 1
                return
            data = await response.read()
            outcome = _outcome(response.status, data)
    except (aiohttp.ClientError, TimeoutError) as exc:
        outcome = type(exc).__name__
    tally.outcomes[outcome] += 1
    if good:
        if outcome == "complete":
            tally.good_served += 1
        elif outcome in ("503 overloaded", "429 rate_limited"):
            tally.good_refused += 1
        else:
            tally.good_failures[outcome] += 1


def _outcome(status: int, data: bytes) -> str:
    if status == 200:
        if data.endswith(b"data: [DONE]\n\n"):
            return "complete"
        return "cut" if b"event: error" not in data else "error event"
    try:
        kind = json.loads(data)["error"]["type"]
    except (ValueError, KeyError, TypeError):
        kind = "?"
    return f"{status} {kind}"
