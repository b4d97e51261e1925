"""Hedging a slow first token (route `hedge:`), over real sockets against fake-llm backends.

Each backend here is the bundled fake-llm in one role: a slow first token (headers and the
role-only delta at once, content only after `ttft`), or a prompt one. The client is the real
`openai` library, and what it reads is compared with fake-llm's canonical answer.
"""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace as otel
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.config.loader import load_config_text
from gateway.engine.hedge import WINDOW_S, HedgeBudget
from gateway.engine.routing import RequestFacts
from gateway.explain import explain_lines
from gateway.observe.tracing import Tracing
from tests.conftest import config_yaml
from tests.support.fake_llm_server import answer, fake_llm
from tests.support.held import metric, nothing_held

MESSAGES = [{"role": "user", "content": "hedge me"}]
BODY = {"model": "m", "messages": MESSAGES}
LIMITS = "limits:\n  concurrency:\n    slots: {capacity: 10, weights: {stream: 3, unary: 1}}\n"


def _config(primary: str, fallback: str | None, hedge: str, endpoints: list[str] | None = None):
    route = f"hedge: {hedge}\nlimits: [slots]\ntimeouts: {{first_chunk: 30s}}\n"
    extra = ""
    if fallback is not None:
        route += "fallbacks: [backup]\n"
        extra = f'backup: {{kind: http, endpoints: [{{url: "{fallback}"}}]}}\n'
    return config_yaml(
        endpoints or primary,
        route=route,
        top=LIMITS,
        upstream="balance: round_robin\n",
        extra_upstreams=extra,
    )


async def _stream(gw) -> tuple[str, set[str], float]:
    """The text, the chunk ids and the seconds the real openai client took for one stream."""
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x", max_retries=0)
    started = time.monotonic()
    try:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, {c.id for c in chunks}, time.monotonic() - started


async def test_a_slow_first_token_is_hedged_on_the_fallback_and_the_slow_try_closed_at_once(
    start_gateway,
):
    async with fake_llm(ttft=20) as slow, fake_llm(ttft=0.05) as fast:
        gw = await start_gateway(_config(slow.url, fast.url, "{after: 300ms}"))
        text, ids, took = await _stream(gw)
        # The hedge won: the whole canonical answer, within `after` + the fallback's time to
        # first token (and a loaded machine's slack), not the slow backend's 20 s.
        assert text == answer(BODY)
        assert len(ids) == 1
        assert 0.3 <= took < 0.3 + 0.05 + 2
        # The slow try is closed as soon as the hedge delivered content, not left running.
        await slow.wait_until(lambda s: s.client_gone == 1, 1.0, "close of the slow try")
        assert slow.stats.streams_completed == 0 and fast.stats.streams_completed == 1
        assert metric(gw, "streamgate_hedges_started_total", route="r") == 1
        assert metric(gw, "streamgate_hedges_won_total", route="r") == 1
        outcome = {"upstream": "up", "outcome": "hedge_lost"}
        assert metric(gw, "streamgate_upstream_attempts_total", **outcome) == 1
        await nothing_held(gw)


async def test_a_hedge_goes_to_another_endpoint_of_the_same_upstream_first(start_gateway):
    async with fake_llm(ttft=20) as slow, fake_llm() as other, fake_llm() as fallback:
        cfg = _config("", fallback.url, "{after: 200ms}", endpoints=[slow.url, other.url])
        gw = await start_gateway(cfg)
        text, _, _ = await _stream(gw)
        assert text == answer(BODY)
        assert (other.stats.streams_completed, fallback.stats.completions_started) == (1, 0)
        await slow.wait_until(lambda s: s.client_gone == 1, 1.0, "close of the slow try")
        await nothing_held(gw)


async def test_when_the_first_try_answers_first_the_hedge_is_closed(start_gateway):
    async with fake_llm(ttft=0.6) as primary, fake_llm(ttft=20) as slower:
        gw = await start_gateway(_config(primary.url, slower.url, "{after: 100ms}"))
        text, _, took = await _stream(gw)
        assert text == answer(BODY) and took >= 0.6
        await slower.wait_until(lambda s: s.client_gone == 1, 1.0, "close of the hedge")
        assert metric(gw, "streamgate_hedges_started_total", route="r") == 1
        assert metric(gw, "streamgate_hedges_won_total", route="r") == 0
        await nothing_held(gw)


async def test_a_client_that_leaves_during_a_hedge_closes_every_try(start_gateway, client):
    async with fake_llm(ttft=20) as one, fake_llm(ttft=20) as two:
        gw = await start_gateway(_config(one.url, two.url, "{after: 100ms}"))
        body = {**BODY, "stream": True}
        request = asyncio.create_task(client.post(gw.url + "/v1/chat/completions", json=body))
        await two.wait_until(lambda s: s.completions_started == 1, 2.0, "the hedge")
        request.cancel()  # the client goes away while both tries wait for a first token
        with pytest.raises(asyncio.CancelledError):
            await request
        for backend in (one, two):
            await backend.wait_until(lambda s: s.client_gone == 1, 1.0, "close of a try")
        await nothing_held(gw)
        assert metric(gw, "streamgate_client_disconnects_total", route="r") == 1


async def test_the_access_log_shows_each_try_and_why(start_gateway, capsys):
    async with fake_llm(ttft=20) as slow, fake_llm() as fast:
        cfg = _config(slow.url, fast.url, "{after: 100ms}")
        gw = await start_gateway(cfg.replace("telemetry: {access_log: off}\n", ""))
        await _stream(gw)
        await nothing_held(gw)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    (record,) = lines
    assert record["upstream"] == "backup" and record["attempts"] == 2
    assert [(t["upstream"], t["why"], t["reason"], t["result"]) for t in record["tries"]] == [
        ("up", "first", None, "hedge_lost"),
        ("backup", "hedge", "slow_first_chunk", "ok"),
    ]


async def test_a_spent_budget_waits_for_the_first_try_instead(start_gateway):
    async with fake_llm(ttft=0.5) as slow, fake_llm() as fast:
        gw = await start_gateway(_config(slow.url, fast.url, "{after: 50ms, budget_percent: 10}"))
        first, _, _ = await _stream(gw)  # hedged: one hedge per window is always allowed
        second, _, took = await _stream(gw)  # 10% of 2 requests is less than a second hedge
        assert first == second == answer(BODY)
        assert took >= 0.5
        assert metric(gw, "streamgate_hedges_started_total", route="r") == 1
        assert metric(gw, "streamgate_hedges_over_budget_total", route="r") == 1
        assert (fast.stats.completions_started, slow.stats.streams_completed) == (1, 1)
        await nothing_held(gw)


async def test_the_trace_shows_the_hedge_and_the_try_it_beat(start_gateway):
    exporter = InMemorySpanExporter()
    async with fake_llm(ttft=20) as slow, fake_llm() as fast:
        gw = await start_gateway(_config(slow.url, fast.url, "{after: 100ms}"))
        gw.runtime.tracing = Tracing.exporting_to(exporter, batch=False)
        await _stream(gw)
        await nothing_held(gw)
        gw.runtime.tracing.shutdown()
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is otel.SpanKind.SERVER]
    first, hedge = sorted(
        (s for s in spans if s.kind is otel.SpanKind.CLIENT),
        key=lambda s: s.attributes["streamgate.attempt"],
    )
    assert [e.name for e in server.events] == ["hedge", "first_chunk"]
    assert server.events[0].attributes["streamgate.after_s"] == pytest.approx(0.1)
    keys = ("streamgate.upstream", "streamgate.try", "streamgate.outcome")
    assert [first.attributes[k] for k in keys] == ["up", "first", "hedge_lost"]
    assert [hedge.attributes[k] for k in keys] == ["backup", "hedge", "ok"]
    assert first.status.status_code is otel.StatusCode.UNSET  # losing a race is no error


def test_the_budget_is_a_share_of_the_requests_of_the_last_window():
    now = [1000.0]
    budget = HedgeBudget(10, clock=lambda: now[0])
    budget.request()
    assert budget.room()  # the floor: one hedge per window, however quiet the route
    budget.spend()
    assert not budget.room()
    for _ in range(29):
        budget.request()
    assert budget.room() and (budget.spend() or True)  # 10% of 30 is 3
    budget.spend()
    assert not budget.room()
    now[0] += WINDOW_S  # the window slides past every request and hedge
    assert budget.room()
    assert not HedgeBudget(0, clock=lambda: now[0]).room()


@pytest.mark.parametrize(
    "hedge, says",
    [
        pytest.param("", "hedge: off", id="off"),
        pytest.param(
            "hedge: {after: 750ms, max_extra: 2, budget_percent: 5}\n",
            "hedge: after 0.75s with no content, the next try (another endpoint, else the next "
            "fallback) starts beside it; up to 2 per request, within 5% of the route's requests",
            id="on",
        ),
    ],
)
def test_explain_shows_the_hedge_policy(hedge, says):
    config = load_config_text(config_yaml("http://127.0.0.1:1", route=hedge), "t.yaml", env={})
    facts = RequestFacts("POST", "/v1/chat/completions", CIMultiDictProxy(CIMultiDict()), "m")
    assert says in "\n".join(explain_lines(config, facts, stream=True))
