"""Token budgets through the real gateway: reserve the estimate at admission, refuse with a
truthful Retry-After, settle to real usage on every exit path. Each scenario runs with
`scope: local` and with `scope: global` (a real redis-server; marked `redis`)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from gateway.admission.redis_state import RedisState
from gateway.admission.redis_tokens import RedisTokenBudget
from gateway.config.loader import load_config_text
from gateway.config.model import StateConfig, TokenBudget
from gateway.engine.routing import RequestFacts
from gateway.errors import ConfigErrors, RateLimited
from gateway.explain import explain_lines
from tests.conftest import chat_body, config_yaml
from tests.support.scripted_upstream import (
    Respond,
    Stall,
    WaitFor,
    content,
    done,
    role_delta,
    usage_chunk,
)
from tests.test_admission import CHAT, NO_RETRY

SCOPES = ["local", pytest.param("global", marks=pytest.mark.redis)]
HOUR = 3600


@pytest.fixture(params=SCOPES)
def scope_yaml(request):
    """(scope, the `state:` section it needs)."""
    if request.param == "local":
        return "local", ""
    url = request.getfixturevalue("redis_url")
    return "global", f"state: {{backend: redis, redis_url: '{url}'}}\n"


def budget_yaml(scope_yaml, tokens: int, per: str = "1h", extra: str = "") -> tuple[str, str]:
    """(top-level YAML, the budget's name); names are unique so a shared Redis keeps no state
    from another test."""
    scope, state = scope_yaml
    name = f"tpm-{uuid.uuid4().hex[:8]}"
    return (
        state
        + "limits:\n  tokens:\n"
        + f"    {name}: {{tokens: {tokens}, per: {per}, scope: {scope}{extra}}}\n"
    ), name


def body_of(max_tokens: int | None, stream: bool = True) -> bytes:
    extra = {} if max_tokens is None else {"max_tokens": max_tokens}
    return json.dumps(chat_body(stream, **extra)).encode()


def prompt_estimate(max_tokens: int | None, stream: bool = True) -> int:
    return len(body_of(max_tokens, stream)) // 4


async def post(client, gw, max_tokens: int | None, stream: bool = True):
    headers = {"Content-Type": "application/json"}
    async with client.post(gw.url + CHAT, data=body_of(max_tokens, stream), headers=headers) as r:
        return r, await r.read()


async def counters(client, gw, limit: str) -> dict[str, float]:
    async with client.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("limit") == limit and sample.name.endswith("_total"):
                found[sample.name.removeprefix("streamgate_token_budget_")] = sample.value
    return found


async def settled(client, gw, limit: str) -> float:
    return (await counters(client, gw, limit)).get("settled_tokens_total", 0.0)


async def settled_becomes(client, gw, limit: str, expected: float) -> None:
    """Settlement of a request whose client left runs when its handler unwinds: wait for it."""
    for _ in range(300):
        if await settled(client, gw, limit) == expected:
            return
        await asyncio.sleep(0.01)
    assert await settled(client, gw, limit) == expected


async def test_a_request_the_budget_cannot_cover_is_refused_with_a_truthful_retry_after(
    start_gateway, upstream, client, scope_yaml
):
    top, name = budget_yaml(scope_yaml, tokens=HOUR)  # one token per second refills
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    release = asyncio.Event()
    upstream.script(
        Respond(
            sse=True,
            chunks=[role_delta(), content("a"), WaitFor(release), usage_chunk(10, 5), done()],
        )
    )
    first = asyncio.get_running_loop().create_task(post(client, gw, 3000))
    await upstream.wait_for_requests(1)

    resp, body = await post(client, gw, 1000)
    assert resp.status == 429
    assert json.loads(body)["error"]["type"] == "rate_limited"
    deficit = prompt_estimate(3000) + 3000 + prompt_estimate(1000) + 1000 - HOUR
    assert abs(int(resp.headers["Retry-After"]) - deficit) <= 2  # one token per second
    assert resp.headers["x-ratelimit-limit-tokens"] == str(HOUR)
    assert resp.headers["x-ratelimit-remaining-tokens"] == "0"

    release.set()
    resp, _ = await first
    assert resp.status == 200
    # Settled to usage (15 tokens), so the same request fits now, and the headers say what is left.
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("b"), usage_chunk(10, 5), done()])
    )
    resp, _ = await post(client, gw, 1000)
    assert resp.status == 200
    remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
    assert abs(remaining - (HOUR - 15 - prompt_estimate(1000) - 1000)) <= 2
    assert float(resp.headers["x-ratelimit-reset-tokens"].removesuffix("s")) > 0
    found = await counters(client, gw, name)
    assert found["refused_total"] == 1
    assert (
        found["reserved_tokens_total"]
        == prompt_estimate(3000) + 3000 + prompt_estimate(1000) + 1000
    )
    await settled_becomes(client, gw, name, 15 + 15)


async def test_without_usage_the_relayed_events_are_counted(
    start_gateway, upstream, client, scope_yaml
):
    top, name = budget_yaml(scope_yaml, tokens=HOUR)
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), *(content("t ") for _ in range(7)), done()])
    )
    resp, _ = await post(client, gw, 500)
    assert resp.status == 200
    # The prompt estimate, and one token per event relayed (role delta, 7 tokens, [DONE]).
    await settled_becomes(client, gw, name, prompt_estimate(500) + 9)


async def test_a_request_without_max_tokens_reserves_the_configured_default(
    start_gateway, upstream, client, scope_yaml
):
    top, name = budget_yaml(scope_yaml, tokens=HOUR, extra=", default_max_tokens: 77")
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    upstream.script(
        Respond(json={"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}})
    )
    resp, _ = await post(client, gw, None, stream=False)
    assert resp.status == 200
    found = await counters(client, gw, name)
    assert found["reserved_tokens_total"] == prompt_estimate(None, stream=False) + 77
    await settled_becomes(client, gw, name, 7)


async def test_a_client_that_leaves_mid_stream_is_charged_what_was_relayed(
    start_gateway, upstream, client, scope_yaml
):
    top, name = budget_yaml(scope_yaml, tokens=HOUR)
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a"), content("b"), content("c"), Stall()])
    )
    async with client.post(gw.url + CHAT, data=body_of(800)) as resp:
        seen = b""
        while seen.count(b"\n\n") < 4:
            seen += await resp.content.readany()
    await upstream.wait_connections_closed()
    await settled_becomes(client, gw, name, prompt_estimate(800) + 4)


async def test_a_stream_cut_by_a_timeout_after_its_commit_point_is_charged_what_was_relayed(
    start_gateway, upstream, client, scope_yaml
):
    top, name = budget_yaml(scope_yaml, tokens=HOUR)
    route = f"limits: [{name}]\ntimeouts: {{chunk_gap: 200ms}}\n"
    gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a"), content("b"), Stall()]))
    resp, body = await post(client, gw, 800)
    assert resp.status == 200 and b"event: error" in body
    await settled_becomes(client, gw, name, prompt_estimate(800) + 3)


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Respond(status=503, json={"error": {"message": "busy"}}), id="error-status"),
        pytest.param(Respond(sse=True, chunks=[role_delta(), Stall()]), id="first-chunk-timeout"),
    ],
)
async def test_a_request_nothing_was_generated_for_is_refunded(
    start_gateway, upstream, client, scope_yaml, answer
):
    top, name = budget_yaml(scope_yaml, tokens=2000)
    route = f"limits: [{name}]\ntimeouts: {{first_chunk: 200ms}}\n" + NO_RETRY
    gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
    upstream.script(answer)
    resp, _ = await post(client, gw, 1800)
    assert resp.status in (503, 504)
    # Everything came back: the same estimate fits again at once.
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a"), usage_chunk(1, 1), done()])
    )
    resp, _ = await post(client, gw, 1800)
    assert resp.status == 200
    assert (await counters(client, gw, name)).get("refused_total", 0) == 0


async def test_a_concurrency_refusal_gives_the_reservation_back(
    start_gateway, upstream, client, scope_yaml
):
    top, name = budget_yaml(scope_yaml, tokens=2000)
    top += "  concurrency:\n    one: {capacity: 1, max_queue: 0}\n"
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}, one]\n", top=top))
    release = asyncio.Event()
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a"), WaitFor(release), done()])
    )
    first = asyncio.get_running_loop().create_task(post(client, gw, 100))
    await upstream.wait_for_requests(1)
    resp, _ = await post(client, gw, 1500)
    assert resp.status == 503  # the queue is full: its 1500 tokens are given back
    release.set()
    await first
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a"), usage_chunk(1, 1), done()])
    )
    resp, _ = await post(client, gw, 1800)
    assert resp.status == 200


async def test_a_reservation_larger_than_the_budget_waits_for_a_full_bucket(
    start_gateway, upstream, client, scope_yaml
):
    top, name = budget_yaml(scope_yaml, tokens=100, per="1s")
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    upstream.default = Respond(
        sse=True, chunks=[role_delta(), content("a"), usage_chunk(100, 400), done()]
    )
    resp, _ = await post(client, gw, 5000)  # capped at the whole budget, so it can be admitted
    assert resp.status == 200
    resp, _ = await post(client, gw, 10)  # it used 500: four more seconds of debt
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) in (4, 5)


@pytest.mark.redis
async def test_a_replica_that_dies_holding_a_reservation_leaves_it_to_refill(redis_url):  # noqa: F811
    """A replica killed between reserve and settle: its estimate stays charged, and comes
    back within `per` like any use (GCRA refill), with no lease to expire."""
    config = TokenBudget(tokens=100, per=1.0, scope="global")
    name = f"tpm-{uuid.uuid4().hex[:8]}"
    dead = RedisState(StateConfig(backend="redis", redis_url=redis_url))
    await RedisTokenBudget(name, config, dead).reserve("k", 100)
    await dead.close()  # never settles
    alive = RedisState(StateConfig(backend="redis", redis_url=redis_url))
    try:
        budget = RedisTokenBudget(name, config, alive)
        with pytest.raises(RateLimited) as refused:
            await budget.reserve("k", 60)
        assert refused.value.retry_after <= 1.0
        await asyncio.sleep(0.65)
        await budget.reserve("k", 60)
    finally:
        await alive.close()
    async with Redis.from_url(redis_url) as raw:
        keys = await raw.keys(f"streamgate:tokens:{{{name}:*")
        ttls = [await raw.pttl(k) for k in keys]
        assert ttls and all(0 < ttl <= 1000 for ttl in ttls)  # it expires by itself


@pytest.mark.redis
async def test_a_tiny_reservation_of_a_huge_global_budget_is_not_a_redis_error(redis_url):  # noqa: F811
    """At µs times near 2^51 a double cannot add 0.1 µs: the TAT does not move, and the
    script must still store a valid expiry (found by loadtests/bench_tokens.py)."""
    config = TokenBudget(tokens=2_000_000_000, per=1.0, scope="global")
    state = RedisState(StateConfig(backend="redis", redis_url=redis_url, on_error="fail_closed"))
    try:
        budget = RedisTokenBudget(f"tpm-{uuid.uuid4().hex[:8]}", config, state)
        for _ in range(3):
            reserved = await budget.reserve("k", 220)  # fail_closed: a script error raises
            reserved.settle(30)
        assert state.up
    finally:
        await state.close()


# ----------------------------------------------------------------- config and explain


@pytest.mark.parametrize(
    "limits, error",
    [
        ("{tokens: {t: {tokens: 0}}}", "limits.tokens.t.tokens: must be at least 1, got 0"),
        ("{tokens: {t: {tokens: 9, per: 0s}}}", "limits.tokens.t.per: must be greater than 0"),
        ("{tokens: {t: {tokens: 9, key: ip}}}", "limits.tokens.t.key: invalid key 'ip'"),
        ("{tokens: {t: {tokens: 9, scope: global}}}", "scope global needs state.backend: redis"),
        ("{tokens: {t: {tokens: 9, bytes_per_token: 0}}}", "bytes_per_token: must be at least 1"),
        ("{tokens: {t: {tokens: 9, burst: 3}}}", "limits.tokens.t.burst: unknown key 'burst'"),
        ("{tokens: {t: {tokens: 9}}, rate: {t: {rate: 1}}}", "also defined in limits.rate"),
    ],
    ids=["tokens", "per", "key", "scope", "bytes-per-token", "unknown-key", "name-clash"],
)
def test_a_bad_token_budget_is_rejected_where_it_is_written(limits, error):
    text = (
        'upstreams: {a: {endpoints: [{url: "http://h"}]}}\n'
        f"limits: {limits}\n"
        "routes: [{name: r, upstream: a, limits: [t]}]\n"
    )
    with pytest.raises(ConfigErrors) as raised:
        load_config_text(text, "gw.yaml", env={})
    messages = [str(e) for e in raised.value.errors]
    assert any(error in m and m.startswith("gw.yaml:2:") for m in messages), messages


def test_explain_shows_the_reservation_a_request_would_make():
    top = "limits:\n  tokens:\n    tpm: {tokens: 5000, per: 1m, key: header:x-key}\n"
    config = load_config_text(
        config_yaml("http://127.0.0.1:1", route="limits: [tpm]\n", top=top), "t.yaml", env={}
    )
    body = json.dumps({"model": "m", "max_tokens": 300, "messages": [{"content": "x" * 400}]})
    facts = RequestFacts("POST", "/v1/chat/completions", {}, "m")
    lines = "\n".join(explain_lines(config, facts, stream=True, body=body))
    prompt = len(body) // 4
    assert (
        f"tpm: tokens 5000 per 60s keyed by header:x-key (local); reserves {prompt + 300} "
        f"(prompt ~{prompt} + completion 300" in lines
    ), lines
