"""Admission with in-memory limits: weighted FIFO concurrency and rate limits, through the real
gateway where it is about HTTP, and the semaphore on its own where it is about ordering.

Global (Redis) limits: tests/test_redis_limits.py, which reuses the scenarios marked below."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.admission.admit import Admission
from gateway.admission.ratelimit import ABSENT_HEADER_KEY, LocalRateLimiter
from gateway.admission.semaphore import WeightedSemaphore
from gateway.app import Gateway
from gateway.config.loader import load_config, load_config_text
from gateway.config.model import ConcurrencyLimit, RateLimit
from gateway.errors import Overloaded, RateLimited
from gateway.observe.metrics import Metrics
from tests.conftest import chat_body, config_yaml
from tests.support.scripted_upstream import (
    NoResponse,
    Reset,
    Respond,
    ScriptedUpstream,
    Stall,
    WaitFor,
    content,
    done,
    role_delta,
    sse_tokens,
)

CHAT = "/v1/chat/completions"
OK_STREAM = Respond(sse=True, chunks=sse_tokens(["ok "]))
NO_RETRY = "retry: {attempts: 1, backoff: {base: 1ms, max: 1ms, jitter: false}}\n"


def slots_yaml(capacity=6, stream=3, unary=1, max_queue=100, scope="local", name="slots") -> str:
    return (
        f"    {name}: {{capacity: {capacity}, weights: {{stream: {stream}, unary: {unary}}}, "
        f"max_queue: {max_queue}, scope: {scope}}}\n"
    )


def limits_yaml(concurrency: str = "", rate: str = "", state: str = "") -> str:
    text = state
    text += "limits:\n"
    if concurrency:
        text += "  concurrency:\n" + concurrency
    if rate:
        text += "  rate:\n" + rate
    return text


# ----------------------------------------------------------------- helpers


class Gates:
    """Every upstream response waits for the test: `open(i)` lets the i-th request (in arrival
    order) finish. Streams send a first content chunk at once, so they commit; unary responses
    send nothing until opened."""

    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        self.events: list[asyncio.Event] = []
        self.all_open = False
        upstream.default = self._respond

    def _respond(self, request) -> Respond:
        event = asyncio.Event()
        if self.all_open:
            event.set()
        self.events.append(event)
        if request.json().get("stream"):
            return Respond(sse=True, chunks=[role_delta(), content("a "), WaitFor(event), done()])
        body = b'{"choices": [{"message": {"content": "ok"}}]}'
        return Respond(headers={"Content-Type": "application/json"}, chunks=[WaitFor(event), body])

    def open(self, *indexes: int) -> None:
        for i in indexes:
            self.events[i].set()

    def open_all(self) -> None:
        """Every response so far, and every one from now on, may finish."""
        self.all_open = True
        for event in self.events:
            event.set()


async def chat(client, gw, stream=True, headers=None) -> tuple[aiohttp.ClientResponse, bytes]:
    async with client.post(gw.url + CHAT, json=chat_body(stream), headers=headers) as resp:
        return resp, await resp.read()


def spawn(coro) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(coro)


async def eventually(predicate, timeout: float = 3, what: str = "condition") -> None:
    """Bounded wait for state that has no event of its own (a queued waiter, a gauge)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s") from None


async def gauges(client, gw, limit: str) -> tuple[float, float, float]:
    """(in_use, capacity, waiting) of one concurrency limit, as /metrics shows them."""
    async with client.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("limit") == limit:
                values[sample.name] = sample.value
    return tuple(
        values[f"streamgate_concurrency_{part}"] for part in ("in_use", "capacity", "waiting")
    )


async def gauges_return_to_zero(client, gw, limit: str, timeout: float = 3) -> None:
    deadline = time.monotonic() + timeout
    while True:
        in_use, _, waiting = await gauges(client, gw, limit)
        if (in_use, waiting) == (0, 0):
            return
        assert time.monotonic() < deadline, f"{limit}: in_use={in_use} waiting={waiting}"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------- scenarios (local and global)


async def scenario_weighted_units(
    start_gateway, upstream, client, top: str, slots: str = "slots"
) -> None:
    """Two streams of weight 3 fill capacity 6; a third waits; unary requests (weight 1) fit
    when units allow."""
    gates = Gates(upstream)
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{slots}]\n", top=top))
    sem = gw.runtime.admission.semaphores[slots]
    first = spawn(chat(client, gw))
    await upstream.wait_for_requests(1)
    second = spawn(chat(client, gw))
    await upstream.wait_for_requests(2)
    assert await gauges(client, gw, slots) == (6, 6, 0)
    third = spawn(chat(client, gw))
    await eventually(lambda: sem.waiting == 1, what="third stream queued")
    assert len(upstream.requests) == 2

    gates.open(0)
    assert (await first)[0].status == 200
    await upstream.wait_for_requests(3)  # the third stream took the units the first gave back
    await eventually(lambda: (sem.in_use, sem.waiting) == (6, 0), what="third stream admitted")

    gates.open(1)
    assert (await second)[0].status == 200
    await eventually(lambda: sem.in_use == 3, what="second stream's units back")
    unary = [spawn(chat(client, gw, stream=False)) for _ in range(4)]
    await upstream.wait_for_requests(6)  # three unary requests fit in the 3 free units...
    await eventually(lambda: sem.waiting == 1, what="fourth unary queued")  # ...a fourth waits
    assert sem.in_use == 6 and len(upstream.requests) == 6

    gates.open(2, 3)
    await upstream.wait_for_requests(7)
    gates.open_all()
    assert [r.status for r, _ in await asyncio.gather(third, *unary)] == [200] * 5
    await gauges_return_to_zero(client, gw, slots)


async def scenario_queue_full_and_queue_timeout(
    start_gateway, upstream, client, top: str, slots: str = "slots"
) -> None:
    gates = Gates(upstream)
    route = f"limits: [{slots}]\ntimeouts: {{queue: 300ms}}\n"
    gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
    sem = gw.runtime.admission.semaphores[slots]
    holder = spawn(chat(client, gw))
    await upstream.wait_for_requests(1)
    queued = spawn(chat(client, gw))
    await eventually(lambda: sem.waiting == 1, what="queued request")

    started = time.monotonic()
    full, body = await chat(client, gw)  # max_queue 1: rejected at once
    assert full.status == 503 and time.monotonic() - started < 0.25
    assert int(full.headers["Retry-After"]) >= 1
    assert full.headers["x-request-id"] in body.decode()
    assert b'"type": "overloaded"' in body

    expired, body = await queued  # waited its 300 ms, then gave up
    assert expired.status == 503 and time.monotonic() - started >= 0.25
    assert int(expired.headers["Retry-After"]) >= 1
    assert b'"type": "overloaded"' in body
    assert len(upstream.requests) == 1  # neither reached the upstream
    gates.open_all()
    assert (await holder)[0].status == 200
    await gauges_return_to_zero(client, gw, slots)


async def scenario_rate_limit_headers(
    start_gateway, upstream, client, top: str, rate: str = "per-route"
) -> None:
    upstream.default = OK_STREAM
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{rate}]\n", top=top))
    seen = []
    for _ in range(3):
        resp, _ = await chat(client, gw)
        seen.append(
            (resp.status, resp.headers["x-ratelimit-limit"], resp.headers["x-ratelimit-remaining"])
        )
    assert seen == [(200, "3", "2"), (200, "3", "1"), (200, "3", "0")]
    limited, body = await chat(client, gw)
    assert limited.status == 429
    assert b'"type": "rate_limited"' in body
    assert limited.headers["x-ratelimit-limit"] == "3"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    # 3 per 60 s: the next request fits in 20 s; whole seconds, at least 1
    assert 15 <= int(limited.headers["Retry-After"]) <= 20
    assert len(upstream.requests) == 3


async def scenario_rejection_gives_back_the_rate(
    start_gateway, upstream, client, top: str, slots: str = "slots", rate: str = "per-route",
    settled=lambda gw: True,
) -> None:
    """Rate limits are charged first; when the concurrency limit after them rejects, the rate
    limit gets its request back (and a request a rate limit rejects never queues).
    `settled(gw)` says when a refund has reached the limiter's store."""
    gates = Gates(upstream)
    route = f"limits: [{rate}, {slots}]\ntimeouts: {{queue: 5s}}\n"
    gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
    sem = gw.runtime.admission.semaphores[slots]
    holder = spawn(chat(client, gw))
    await upstream.wait_for_requests(1)
    full, _ = await chat(client, gw)  # rate ok (1 of 2 left), then max_queue 0: 503
    assert full.status == 503
    await eventually(lambda: settled(gw), what="refund settled")
    again, _ = await chat(client, gw)  # the 503 gave its rate back: still one left
    assert again.status == 503
    await eventually(lambda: settled(gw), what="refund settled")
    gates.open_all()
    assert (await holder)[0].status == 200
    await eventually(lambda: sem.in_use == 0, what="holder's units back")
    ok, _ = await chat(client, gw)
    assert (ok.status, ok.headers["x-ratelimit-remaining"]) == (200, "0")
    assert sem.in_use == 0
    started = time.monotonic()
    limited, _ = await chat(client, gw)  # rate exhausted: 429 at once, no queue wait
    assert limited.status == 429 and time.monotonic() - started < 1
    assert sem.waiting == 0


async def scenario_leaving_while_queued_gives_everything_back(
    start_gateway, upstream, client, top: str, pool="pool", gpu="gpu", rate="per-route",
    settled=lambda gw: True,
) -> None:
    """Limits are charged in the route's order: a request holding the rate limit and `pool`
    that leaves while queued for `gpu` gives both back."""
    gates = Gates(upstream)
    route = f"limits: [{pool}, {rate}, {gpu}]\n"  # rate limits go first whatever the listing
    gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
    sems = gw.runtime.admission.semaphores
    holder = spawn(chat(client, gw))
    await upstream.wait_for_requests(1)
    queued = spawn(chat(client, gw))
    await eventually(lambda: sems[gpu].waiting == 1, what="queued for the second limit")
    assert (sems[pool].in_use, sems[gpu].in_use) == (2, 1)
    queued.cancel()
    await eventually(lambda: (sems[pool].in_use, sems[gpu].waiting) == (1, 0), what="given back")
    gates.open_all()
    assert (await holder)[0].status == 200
    await eventually(lambda: settled(gw), what="refund settled")
    resp, _ = await chat(client, gw)
    assert resp.headers["x-ratelimit-remaining"] == "8"  # 10 - the holder - this one
    for name in (pool, gpu):
        await gauges_return_to_zero(client, gw, name)


async def test_two_streams_of_weight_3_fill_capacity_6_and_unary_requests_fit_the_rest(
    start_gateway, upstream, client
):
    top = limits_yaml(slots_yaml(capacity=6, stream=3, unary=1))
    await scenario_weighted_units(start_gateway, upstream, client, top)


async def test_queue_full_and_queue_timeout_are_503_with_retry_after(
    start_gateway, upstream, client
):
    top = limits_yaml(slots_yaml(capacity=1, stream=1, unary=1, max_queue=1))
    await scenario_queue_full_and_queue_timeout(start_gateway, upstream, client, top)


async def test_rate_limit_headers_count_down_and_a_429_says_when_to_retry(
    start_gateway, upstream, client
):
    top = limits_yaml(rate="    per-route: {rate: 3, per: 60s, key: route}\n")
    await scenario_rate_limit_headers(start_gateway, upstream, client, top)


async def test_a_later_rejection_gives_back_what_earlier_limits_took(
    start_gateway, upstream, client
):
    top = limits_yaml(
        slots_yaml(capacity=1, stream=1, unary=1, max_queue=0),
        rate="    per-route: {rate: 2, per: 60s, key: route}\n",
    )
    await scenario_rejection_gives_back_the_rate(start_gateway, upstream, client, top)


async def test_leaving_while_queued_for_a_later_limit_gives_back_the_earlier_ones(
    start_gateway, upstream, client
):
    top = limits_yaml(
        slots_yaml(capacity=4, stream=1, unary=1, name="pool")
        + slots_yaml(capacity=1, stream=1, unary=1, name="gpu"),
        rate="    per-route: {rate: 10, per: 60s}\n",
    )
    await scenario_leaving_while_queued_gives_everything_back(start_gateway, upstream, client, top)


# ----------------------------------------------------------------- every exit path releases


EXIT_PATHS = [
    pytest.param(
        Respond(sse=True, chunks=sse_tokens(["a ", "b "])), "", "read", 200, id="completed"
    ),
    pytest.param(
        Respond(sse=True, chunks=[role_delta(), content("a "), Reset()]),
        "", "read", 200, id="upstream-reset-mid-stream",
    ),
    pytest.param(
        Respond(status=500, json={"error": {"message": "boom"}}),
        "", "read", 500, id="upstream-error-status",
    ),
    pytest.param(NoResponse(), "timeouts: {first_chunk: 200ms}\n", "read", 504, id="first-chunk-timeout"),
    pytest.param(
        Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]),
        "timeouts: {chunk_gap: 200ms}\n", "read", 200, id="chunk-gap-timeout",
    ),
    pytest.param(
        Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]),
        "", "disconnect", 200, id="client-disconnect-mid-stream",
    ),
    pytest.param(NoResponse(), "", "cancel", None, id="client-disconnect-before-first-chunk"),
]


@pytest.mark.parametrize(("response", "route", "client_does", "status"), EXIT_PATHS)
async def test_units_are_released_on_every_exit_path(
    start_gateway, upstream, client, response, route, client_does, status
):
    upstream.script(response)
    top = limits_yaml(slots_yaml(capacity=4, stream=3, unary=1))
    gw = await start_gateway(
        config_yaml(upstream.url, route="limits: [slots]\n" + NO_RETRY + route, top=top)
    )
    if client_does == "cancel":
        request = spawn(chat(client, gw))
        await upstream.wait_for_requests(1)
        assert (await gauges(client, gw, "slots"))[0] == 3
        request.cancel()
        await upstream.wait_for_closed_events(1)
    else:
        async with client.post(gw.url + CHAT, json=chat_body(stream=True)) as resp:
            assert resp.status == status
            if client_does == "disconnect":
                await resp.content.readuntil(b"a ")
                assert (await gauges(client, gw, "slots"))[0] == 3
                resp.close()
            else:
                await resp.read()
    await gauges_return_to_zero(client, gw, "slots")


async def test_a_request_cancelled_while_queued_leaves_the_queue_and_takes_nothing(
    start_gateway, upstream, client
):
    gates = Gates(upstream)
    top = limits_yaml(slots_yaml(capacity=3, stream=3, unary=1))
    gw = await start_gateway(config_yaml(upstream.url, route="limits: [slots]\n", top=top))
    holder = spawn(chat(client, gw))
    await upstream.wait_for_requests(1)
    queued = spawn(chat(client, gw))
    await eventually(lambda: gw.runtime.admission.semaphores["slots"].waiting == 1)
    assert await gauges(client, gw, "slots") == (3, 3, 1)
    queued.cancel()
    await eventually(lambda: gw.runtime.admission.semaphores["slots"].waiting == 0)
    gates.open_all()
    assert (await holder)[0].status == 200
    await gauges_return_to_zero(client, gw, "slots")
    assert len(upstream.requests) == 1


# ----------------------------------------------------------------- the semaphore on its own


def _limit(capacity: int, max_queue: int = 100) -> ConcurrencyLimit:
    return ConcurrencyLimit(capacity=capacity, max_queue=max_queue)


async def test_the_queue_is_fifo_and_a_heavy_head_is_not_starved_by_light_requests():
    sem = WeightedSemaphore("s", _limit(4))
    granted: list[str] = []

    async def request(name: str, units: int) -> None:
        handle = await sem.acquire(units, timeout=5)
        granted.append(name)
        await release_events[name].wait()
        sem.release(handle)

    names = ["holder", "heavy", *(f"light{i}" for i in range(6))]
    release_events = {name: asyncio.Event() for name in names}
    tasks = [spawn(request("holder", 2))]
    await eventually(lambda: granted == ["holder"])
    tasks.append(spawn(request("heavy", 4)))  # 2 units are free, it needs 4: waits
    await eventually(lambda: sem.waiting == 1)
    tasks += [spawn(request(f"light{i}", 1)) for i in range(6)]  # each would fit: they queue
    await eventually(lambda: sem.waiting == 7)
    assert granted == ["holder"] and sem.in_use == 2

    release_events["holder"].set()
    await eventually(lambda: granted == ["holder", "heavy"])
    assert (sem.in_use, sem.waiting) == (4, 6)
    release_events["heavy"].set()
    await eventually(lambda: len(granted) == 6)
    assert granted[2:] == ["light0", "light1", "light2", "light3"]  # arrival order, 4 fit
    for event in release_events.values():
        event.set()
    await asyncio.gather(*tasks)
    assert granted[6:] == ["light4", "light5"]
    assert (sem.in_use, sem.waiting) == (0, 0)


async def test_a_heavy_head_that_gives_up_lets_the_light_requests_behind_it_in():
    sem = WeightedSemaphore("s", _limit(4))
    held = await sem.acquire(2, timeout=1)
    heavy = spawn(sem.acquire(4, timeout=0.1))
    light = spawn(sem.acquire(1, timeout=5))
    with pytest.raises(Overloaded):
        await heavy
    assert await light == 1  # admitted the moment the heavy head left
    assert (sem.in_use, sem.waiting) == (3, 0)
    sem.release(held)
    sem.release(1)
    assert sem.in_use == 0


async def test_a_waiter_granted_in_the_instant_it_is_cancelled_gives_its_units_back():
    sem = WeightedSemaphore("s", _limit(1))
    held = await sem.acquire(1, timeout=1)
    waiter = spawn(sem.acquire(1, timeout=5))
    await eventually(lambda: sem.waiting == 1)
    sem.release(held)  # grants the waiter...
    waiter.cancel()  # ...which is cancelled before it ever runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (sem.in_use, sem.waiting) == (0, 0)


async def test_waits_are_observed_only_for_requests_that_queued():
    waits: list[float] = []
    sem = WeightedSemaphore("s", _limit(1), observe_wait=waits.append)
    held = await sem.acquire(1, timeout=1)
    assert waits == []
    waiter = spawn(sem.acquire(1, timeout=5))
    await asyncio.sleep(0.05)
    sem.release(held)
    sem.release(await waiter)
    assert len(waits) == 1 and waits[0] >= 0.04


async def test_growing_capacity_lets_waiters_in_and_shrinking_it_keeps_units_held():
    sem = WeightedSemaphore("s", _limit(2))
    first = await sem.acquire(2, timeout=1)
    waiter = spawn(sem.acquire(2, timeout=5))
    await eventually(lambda: sem.waiting == 1)
    sem.resize(4, 100)
    assert await waiter == 2
    assert sem.in_use == 4
    sem.resize(1, 100)  # nothing taken away; new requests wait until in_use drops below
    late = spawn(sem.acquire(1, timeout=5))
    await eventually(lambda: sem.waiting == 1)
    sem.release(first)
    sem.release(2)
    assert await late == 1
    sem.release(1)
    assert (sem.in_use, sem.waiting) == (0, 0)


# ----------------------------------------------------------------- the rate limiter on its own


@pytest.mark.parametrize(
    ("key", "headers", "same_bucket"),
    [
        pytest.param("route", ({}, {}), True, id="route"),
        pytest.param("header:x-api-key", ({"x-api-key": "a"}, {"x-api-key": "b"}), False,
                     id="header-different-values"),
        pytest.param("header:x-api-key", ({}, {}), True, id="header-absent-shares-one-bucket"),
        pytest.param("header:x-api-key", ({"X-Api-Key": "a"}, {"x-api-key": "a"}), True,
                     id="header-name-is-case-insensitive"),
    ],
)
async def test_rate_limit_keys(key, headers, same_bucket):
    from multidict import CIMultiDict, CIMultiDictProxy

    limiter = LocalRateLimiter("k", RateLimit(rate=1, per=60, key=key))
    keys = [
        limiter.key_of("route-a", "10.0.0.1", CIMultiDictProxy(CIMultiDict(h))) for h in headers
    ]
    await limiter.take(keys[0])
    if same_bucket:
        with pytest.raises(RateLimited):
            await limiter.take(keys[1])
    else:
        assert (await limiter.take(keys[1])).remaining == 0
    if headers == ({}, {}) and key.startswith("header:"):
        assert keys == [ABSENT_HEADER_KEY, ABSENT_HEADER_KEY]


async def test_the_key_space_is_bounded_least_recently_used_first():
    limiter = LocalRateLimiter("k", RateLimit(rate=1, per=60, key="client_ip", max_keys=2))
    for ip in ("a", "b"):
        await limiter.take(ip)
    with pytest.raises(RateLimited):
        await limiter.take("a")  # refreshes "a"
    await limiter.take("c")  # over max_keys: "b", least recently used, is forgotten
    assert len(limiter._buckets) == 2
    assert (await limiter.take("b")).remaining == 0  # a fresh bucket
    with pytest.raises(RateLimited):
        await limiter.take("c")


async def test_a_rate_below_one_per_period_still_admits_one_and_then_waits_longer():
    limiter = LocalRateLimiter("slow", RateLimit(rate=0.5, per=60))
    assert (await limiter.take("k")).remaining == 0
    with pytest.raises(RateLimited) as rejected:
        await limiter.take("k")
    assert 110 <= rejected.value.retry_after <= 120  # one request per 120 s
    assert limiter.limit == 1


async def test_a_refund_gives_the_request_back():
    limiter = LocalRateLimiter("r", RateLimit(rate=1, per=60))
    taken = await limiter.take("k")
    taken.refund()
    assert (await limiter.take("k")).remaining == 0


async def test_rate_limited_requests_are_counted_by_limit(start_gateway, upstream, client):
    upstream.default = OK_STREAM
    top = limits_yaml(rate="    one: {rate: 1, per: 60s}\n")
    gw = await start_gateway(config_yaml(upstream.url, route="limits: [one]\n", top=top))
    assert [(await chat(client, gw))[0].status for _ in range(3)] == [200, 429, 429]
    async with client.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'streamgate_rate_limited_total{limit="one"} 2.0' in text


# ----------------------------------------------------------------- reload


async def test_a_reload_keeps_a_limits_live_state_and_applies_a_new_capacity(
    tmp_path, upstream, client
):
    """Streams in flight release into the same semaphore; a larger capacity lets the queue in."""
    gates = Gates(upstream)
    path = tmp_path / "gateway.yaml"

    def write(capacity: int) -> None:
        top = limits_yaml(
            slots_yaml(capacity=capacity, stream=1, unary=1),
            rate="    per-route: {rate: 100, per: 60s}\n",
        )
        path.write_text(config_yaml(upstream.url, route="limits: [per-route, slots]\n", top=top))

    write(1)
    gateway = Gateway(str(path), load_config(str(path)))
    url, admin_url = await gateway.start()
    gw = SimpleNamespace(url=url, admin_url=admin_url)
    try:
        before = gateway.runtime.admission
        holder = spawn(chat(client, gw))
        await upstream.wait_for_requests(1)
        queued = spawn(chat(client, gw))
        await eventually(lambda: before.semaphores["slots"].waiting == 1)

        write(2)
        old_runtime = gateway.runtime
        assert await gateway.reload() == []
        after = gateway.runtime.admission
        assert after is not before
        assert after.semaphores["slots"] is before.semaphores["slots"]
        assert after.rate_limiters["per-route"] is before.rate_limiters["per-route"]
        await upstream.wait_for_requests(2)  # the new capacity let the queued request in
        assert await gauges(client, gw, "slots") == (2, 2, 0)

        gates.open_all()
        assert [(await t)[0].status for t in (holder, queued)] == [200, 200]
        await gauges_return_to_zero(client, gw, "slots")
        await eventually(  # the old runtime closes once its streams are done
            lambda: all(p.client.session.closed for p in old_runtime.pools.values()), what="old closed"
        )
    finally:
        await gateway.stop()


async def test_a_limit_that_changes_scope_or_rate_is_rebuilt():
    base = (
        "upstreams: {up: {kind: http, endpoints: [{url: 'http://127.0.0.1:9'}]}}\n"
        "routes: [{name: r, upstream: up, limits: [slots, per-route]}]\n"
    )

    def config(capacity: int, rate: int):
        text = limits_yaml(
            slots_yaml(capacity=capacity, stream=1, unary=1), f"    per-route: {{rate: {rate}}}\n"
        )
        return load_config_text(text + base, "t.yaml", env={})

    metrics = Metrics()
    first = await Admission.start(config(2, 5), metrics)
    same = await Admission.start(config(3, 5), metrics, previous=first)
    assert same.semaphores["slots"] is first.semaphores["slots"]
    assert same.semaphores["slots"].capacity == 3
    assert same.rate_limiters["per-route"] is first.rate_limiters["per-route"]
    changed = await Admission.start(config(3, 6), metrics, previous=same)
    assert changed.rate_limiters["per-route"] is not same.rate_limiters["per-route"]
    for admission in (first, same, changed):
        await admission.close()
