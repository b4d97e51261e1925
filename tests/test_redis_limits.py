"""Global limits shared through a real redis-server (started here on a free port, or REDIS_URL):
the local scenarios again with `scope: global`, several replicas (gateway processes) sharing one
limit, a replica killed while holding units, and Redis going away under both `on_error`
policies. Limit names are unique per test, so an external Redis keeps no state between tests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.admission.admit import Admission
from gateway.admission.redis_ratelimit import RedisRateLimiter
from gateway.admission.redis_semaphore import GlobalSemaphore
from gateway.admission.redis_state import DOWN_FOR_S, RedisState
from gateway.config.loader import load_config_text
from gateway.config.model import ConcurrencyLimit, RateLimit, StateConfig
from gateway.errors import Overloaded, RateLimited
from gateway.observe.metrics import Metrics
from tests.conftest import GatewayProcess, chat_body, config_yaml
from tests.support.redis_server import RedisServer
from tests.support.scripted_upstream import Respond, Stall, content, role_delta, sse_tokens
from tests.test_admission import (
    CHAT,
    Gates,
    chat,
    eventually,
    gauges,
    gauges_return_to_zero,
    limits_yaml,
    scenario_leaving_while_queued_gives_everything_back,
    scenario_queue_full_and_queue_timeout,
    scenario_rate_limit_headers,
    scenario_rejection_gives_back_the_rate,
    scenario_weighted_units,
    slots_yaml,
    spawn,
)

pytestmark = pytest.mark.redis

OK_UNARY = Respond(json={"choices": [{"message": {"content": "ok"}}]})


@pytest.fixture
def redis_server():
    """A private redis-server this test may stop and start again."""
    with RedisServer() as server:
        yield server


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def state_yaml(url: str, lease_ttl: str = "2s", on_error: str = "fail_open") -> str:
    return (
        f"state: {{backend: redis, redis_url: '{url}', lease_ttl: {lease_ttl}, "
        f"on_error: {on_error}}}\n"
    )


async def redis_leases(url: str, limit: str) -> int:
    """Leases Redis holds for a global concurrency limit."""
    client = Redis.from_url(url)
    try:
        return await client.zcard(f"streamgate:concurrency:{{{limit}}}:leases")
    finally:
        await client.aclose()


async def redis_leases_return_to_zero(url: str, limit: str, timeout: float = 3) -> None:
    """Releases reach Redis in the background, just after the local release."""
    deadline = time.monotonic() + timeout
    while (held := await redis_leases(url, limit)) != 0:
        assert time.monotonic() < deadline, f"{limit}: {held} leases still in redis"
        await asyncio.sleep(0.01)


def background_settled(gw) -> bool:
    """The gateway's Redis state has no call in flight (refunds, releases)."""
    state = gw.runtime.admission._state
    return state is None or not state._tasks


# ----------------------------------------------------------------- the local scenarios, global


async def test_global_weighted_units(start_gateway, upstream, client, redis_url):
    slots = unique("slots")
    top = limits_yaml(
        slots_yaml(capacity=6, stream=3, unary=1, scope="global", name=slots),
        state=state_yaml(redis_url),
    )
    await scenario_weighted_units(start_gateway, upstream, client, top, slots=slots)
    await redis_leases_return_to_zero(redis_url, slots)


async def test_global_queue_full_and_queue_timeout(start_gateway, upstream, client, redis_url):
    slots = unique("slots")
    top = limits_yaml(
        slots_yaml(capacity=1, stream=1, unary=1, max_queue=1, scope="global", name=slots),
        state=state_yaml(redis_url),
    )
    await scenario_queue_full_and_queue_timeout(start_gateway, upstream, client, top, slots=slots)


async def test_global_rate_limit_headers(start_gateway, upstream, client, redis_url):
    rate = unique("per-route")
    top = limits_yaml(
        rate=f"    {rate}: {{rate: 3, per: 60s, key: route, scope: global}}\n",
        state=state_yaml(redis_url),
    )
    await scenario_rate_limit_headers(start_gateway, upstream, client, top, rate=rate)


async def test_global_rejection_gives_back_the_rate(start_gateway, upstream, client, redis_url):
    slots, rate = unique("slots"), unique("per-route")
    top = limits_yaml(
        slots_yaml(capacity=1, stream=1, unary=1, max_queue=0, scope="global", name=slots),
        rate=f"    {rate}: {{rate: 2, per: 60s, key: route, scope: global}}\n",
        state=state_yaml(redis_url),
    )
    await scenario_rejection_gives_back_the_rate(
        start_gateway, upstream, client, top, slots=slots, rate=rate, settled=background_settled
    )


async def test_global_leaving_while_queued_gives_everything_back(
    start_gateway, upstream, client, redis_url
):
    pool, gpu, rate = unique("pool"), unique("gpu"), unique("per-route")
    top = limits_yaml(
        slots_yaml(capacity=4, stream=1, unary=1, scope="global", name=pool)
        + slots_yaml(capacity=1, stream=1, unary=1, scope="global", name=gpu),
        rate=f"    {rate}: {{rate: 10, per: 60s, scope: global}}\n",
        state=state_yaml(redis_url),
    )
    await scenario_leaving_while_queued_gives_everything_back(
        start_gateway, upstream, client, top, pool, gpu, rate, settled=background_settled
    )
    for name in (pool, gpu):
        await redis_leases_return_to_zero(redis_url, name)


@pytest.mark.parametrize("client_does", ["read", "disconnect"])
async def test_global_units_are_released_here_and_in_redis(
    start_gateway, upstream, client, redis_url, client_does
):
    gates = Gates(upstream)
    slots = unique("slots")
    top = limits_yaml(
        slots_yaml(capacity=4, stream=3, unary=1, scope="global", name=slots),
        state=state_yaml(redis_url),
    )
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{slots}]\n", top=top))
    async with client.post(gw.url + CHAT, json=chat_body(stream=True)) as resp:
        await resp.content.readuntil(b"a ")
        assert (await gauges(client, gw, slots))[0] == 3
        assert await redis_leases(redis_url, slots) == 1
        if client_does == "disconnect":
            resp.close()
        else:
            gates.open_all()
            await resp.read()
    await gauges_return_to_zero(client, gw, slots)
    await eventually(lambda: background_settled(gw), what="release reaching redis")
    assert await redis_leases(redis_url, slots) == 0


# ----------------------------------------------------------------- the shared queue


async def shared_queue_holds(state: RedisState, limit: str, n: int) -> None:
    queue = f"streamgate:concurrency:{{{limit}}}:queue"
    deadline = time.monotonic() + 3
    while await state.client.zcard(queue) != n:
        assert time.monotonic() < deadline, f"the shared queue of {limit} never held {n}"
        await asyncio.sleep(0.01)


async def test_the_shared_queue_is_fifo_across_replicas(redis_url):
    """A heavy request queued on one replica is not starved by light ones on another, even
    while units are free that each light one would fit in."""
    config = StateConfig(backend="redis", redis_url=redis_url, lease_ttl=2.0)
    name, limit = unique("fifo"), ConcurrencyLimit(capacity=4)
    replica_a, replica_b = RedisState(config), RedisState(config)
    try:
        sem_a = GlobalSemaphore(name, limit, replica_a, lambda s: None)
        sem_b = GlobalSemaphore(name, limit, replica_b, lambda s: None)
        granted: list[str] = []

        async def acquire(sem, label, units):
            lease = await sem.acquire(units, timeout=5)
            granted.append(label)
            return lease

        holder = await acquire(sem_a, "holder", 2)
        heavy = spawn(acquire(sem_b, "heavy", 4))
        await shared_queue_holds(replica_a, name, 1)  # the heavy one heads the shared queue
        lights = []
        for i in range(3):  # one after another: their order in the queue is defined
            lights.append(spawn(acquire(sem_a, f"light{i}", 1)))
            await eventually(lambda i=i: sem_a.waiting == i + 1)
        await asyncio.sleep(0.2)  # 2 units are free all along: no light one may take them
        assert granted == ["holder"]

        sem_a.release(holder)
        heavy_lease = await heavy
        assert granted == ["holder", "heavy"]
        sem_b.release(heavy_lease)
        leases = await asyncio.gather(*lights)
        assert granted[2:] == ["light0", "light1", "light2"]
        for lease in leases:
            sem_a.release(lease)
        assert (sem_a.in_use, sem_b.in_use) == (0, 0)
    finally:
        await replica_a.close()
        await replica_b.close()
    assert await redis_leases(redis_url, name) == 0


async def test_a_release_on_one_replica_wakes_a_waiter_on_another_without_polling(
    redis_url, monkeypatch
):
    monkeypatch.setattr("gateway.admission.redis_semaphore.POLL_S", 30.0)  # only an announcement helps
    config = StateConfig(backend="redis", redis_url=redis_url, lease_ttl=10.0)
    name, limit = unique("wake"), ConcurrencyLimit(capacity=1)
    replica_a, replica_b = RedisState(config), RedisState(config)
    try:
        sem_a = GlobalSemaphore(name, limit, replica_a, lambda s: None)
        sem_b = GlobalSemaphore(name, limit, replica_b, lambda s: None)
        held = await sem_a.acquire(1, timeout=1)
        waiter = spawn(sem_b.acquire(1, timeout=20))
        await shared_queue_holds(replica_a, name, 1)  # its first try has queued it
        sem_a.release(held)
        async with asyncio.timeout(2):
            sem_b.release(await waiter)
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_rate_limit_keys_reach_redis_only_as_digests(redis_url):
    state = RedisState(StateConfig(backend="redis", redis_url=redis_url))
    name = unique("keyed")
    try:
        limiter = RedisRateLimiter(name, RateLimit(rate=1, per=60, key="header:x-api-key"), state)
        taken = await limiter.take("secret-token-value")
        assert taken.remaining == 0
        with pytest.raises(RateLimited) as rejected:
            await limiter.take("secret-token-value")
        assert 55 <= rejected.value.retry_after <= 60
        keys = await state.client.keys(f"streamgate:rate:{name}:*")
        assert len(keys) == 1 and b"secret" not in keys[0]
        taken.refund()
        await eventually(lambda: not state._tasks, what="refund")
        assert (await limiter.take("secret-token-value")).remaining == 0
    finally:
        await state.close()


async def test_a_reload_keeps_the_redis_state_and_global_limits_unless_state_changes(redis_url):
    def config(lease_ttl: str, capacity: int):
        text = limits_yaml(
            slots_yaml(capacity=capacity, scope="global", name="g"),
            rate="    r: {rate: 5, scope: global}\n",
            state=state_yaml(redis_url, lease_ttl=lease_ttl),
        )
        routes = (
            "upstreams: {up: {kind: http, endpoints: [{url: 'http://127.0.0.1:9'}]}}\n"
            "routes: [{name: r1, upstream: up, limits: [r, g]}]\n"
        )
        return load_config_text(text + routes, "t.yaml", env={})

    metrics = Metrics()
    first = await Admission.start(config("2s", 6), metrics)
    resized = await Admission.start(config("2s", 8), metrics, previous=first)
    assert resized._state is first._state
    assert resized.semaphores["g"] is first.semaphores["g"]
    assert resized.semaphores["g"].capacity == 8
    assert resized.rate_limiters["r"] is first.rate_limiters["r"]
    moved = await Admission.start(config("3s", 8), metrics, previous=resized)
    assert moved._state is not resized._state
    assert moved.semaphores["g"] is not resized.semaphores["g"]
    await first.close()
    await resized.close()  # the last user of the first state: now it disconnects
    await moved.close()


# ----------------------------------------------------------------- replicas (gateway processes)


async def start_replicas(tmp_path, yaml_text: str, n: int) -> list[GatewayProcess]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml_text)
    replicas = [GatewayProcess(path) for _ in range(n)]
    await asyncio.gather(*(r.start() for r in replicas))
    return replicas


async def stop_replicas(replicas: list[GatewayProcess]) -> None:
    await asyncio.gather(*(r.stop() for r in replicas if r.proc is not None))


async def test_two_replicas_share_one_global_rate_limit(tmp_path, upstream, redis_url):
    """100 per 100 s shared by two gateways: over a couple of seconds of heavy traffic the two
    together admit the burst of 100 plus what refilled meanwhile (one per second), within 5%.
    Either alone would admit 100 if the limit were not shared."""
    upstream.default = OK_UNARY
    rate = unique("shared")
    top = limits_yaml(
        rate=f"    {rate}: {{rate: 100, per: 100s, key: route, scope: global}}\n",
        state=state_yaml(redis_url),
    )
    replicas = await start_replicas(
        tmp_path, config_yaml(upstream.url, route=f"limits: [{rate}]\n", top=top), 2
    )
    statuses: dict[int, list[int]] = {0: [], 1: []}
    try:
        async with aiohttp.ClientSession() as session:

            async def worker(i: int) -> None:
                for _ in range(15):
                    async with session.post(
                        replicas[i % 2].url + CHAT, json=chat_body(stream=False)
                    ) as resp:
                        await resp.read()
                        statuses[i % 2].append(resp.status)
                        if resp.status == 429:
                            assert int(resp.headers["Retry-After"]) >= 1
                            assert resp.headers["x-ratelimit-remaining"] == "0"

            started = time.monotonic()
            await asyncio.gather(*(worker(i) for i in range(20)))
            elapsed = time.monotonic() - started
    finally:
        await stop_replicas(replicas)
    admitted = [statuses[i].count(200) for i in (0, 1)]
    assert set(statuses[0] + statuses[1]) == {200, 429}
    expected = 100 + elapsed * 1.0
    assert abs(sum(admitted) - expected) <= 0.05 * expected, (admitted, elapsed)
    # Each replica alone would admit 100: the sum above proves they share one bucket. Which
    # replica drained the burst is a race, so only check that both met the shared limit.
    assert all(429 in statuses[i] for i in (0, 1))
    assert len(upstream.requests) == sum(admitted)


async def test_two_replicas_never_exceed_one_global_concurrency_limit(
    tmp_path, upstream, redis_url
):
    in_flight, peak = 0, 0

    async def slow_answer(request) -> Respond:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return OK_UNARY

    upstream.default = slow_answer
    slots = unique("slots")
    top = limits_yaml(
        slots_yaml(capacity=4, stream=2, unary=1, scope="global", name=slots),
        state=state_yaml(redis_url),
    )
    route = f"limits: [{slots}]\ntimeouts: {{queue: 20s}}\n"
    replicas = await start_replicas(tmp_path, config_yaml(upstream.url, route=route, top=top), 2)
    try:
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> int:
                async with session.post(
                    replicas[i % 2].url + CHAT, json=chat_body(stream=False)
                ) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(i) for i in range(40)))
    finally:
        await stop_replicas(replicas)
    assert statuses == [200] * 40
    assert peak == 4  # the limit was reached, and never exceeded
    assert await redis_leases(redis_url, slots) == 0


async def admin_waiting(session: aiohttp.ClientSession, replica: GatewayProcess, limit: str):
    async with session.get(replica.admin_url + "/metrics") as resp:
        text = await resp.text()
    line = f'streamgate_concurrency_waiting{{limit="{limit}"}} '
    return next(float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line))


async def test_units_of_a_replica_killed_with_sigkill_return_within_the_lease_ttl(
    tmp_path, upstream, redis_url
):
    lease_ttl = 1.5
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]))
    upstream.default = Respond(sse=True, chunks=sse_tokens(["b "]))
    slots = unique("slots")
    top = limits_yaml(
        slots_yaml(capacity=1, stream=1, unary=1, scope="global", name=slots),
        state=state_yaml(redis_url, lease_ttl=f"{lease_ttl}s"),
    )
    route = f"limits: [{slots}]\ntimeouts: {{queue: 10s}}\n"
    doomed, survivor = await start_replicas(
        tmp_path, config_yaml(upstream.url, route=route, top=top), 2
    )
    try:
        async with aiohttp.ClientSession() as session:
            holder = await session.post(doomed.url + CHAT, json=chat_body())
            await holder.content.readuntil(b"a ")  # the doomed replica holds the only unit
            queued = spawn(session.post(survivor.url + CHAT, json=chat_body()))
            deadline = time.monotonic() + 3
            while await admin_waiting(session, survivor, slots) != 1:
                assert time.monotonic() < deadline, "the survivor's request never queued"
                await asyncio.sleep(0.01)
            assert len(upstream.requests) == 1

            doomed.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await upstream.wait_for_requests(2, timeout=lease_ttl + 2)
            waited = time.monotonic() - killed_at
            response = await queued
            assert response.status == 200
            await response.read()
            holder.close()
    finally:
        await stop_replicas([doomed, survivor])
    # The lease was last renewed at most ttl/3 before the kill: it expired 2/3 to 3/3 of a TTL
    # later, and the survivor's next poll saw it.
    assert lease_ttl / 3 <= waited <= lease_ttl + 0.5, waited


# ----------------------------------------------------------------- Redis goes away


@pytest.mark.parametrize("kind", ["rate", "concurrency"])
async def test_fail_closed_rejects_with_503_while_redis_is_down_and_recovers_by_itself(
    start_gateway, upstream, client, redis_server, kind
):
    upstream.default = OK_UNARY
    name = unique(kind)
    if kind == "rate":
        limits = limits_yaml(rate=f"    {name}: {{rate: 1000, per: 1s, scope: global}}\n")
    else:
        limits = limits_yaml(slots_yaml(capacity=4, scope="global", name=name))
    top = state_yaml(redis_server.url, on_error="fail_closed") + limits
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    assert (await chat(client, gw, stream=False))[0].status == 200

    await redis_server.stop()
    started = time.monotonic()
    resp, body = await chat(client, gw, stream=False)
    assert resp.status == 503 and b'"type": "state_unavailable"' in body
    assert int(resp.headers["Retry-After"]) >= 1
    assert time.monotonic() - started < 1.5  # bounded by the call timeout
    resp, _ = await chat(client, gw, stream=False)  # known down: rejected at once
    assert resp.status == 503
    assert len(upstream.requests) == 1

    await redis_server.start()
    deadline = time.monotonic() + DOWN_FOR_S + 3
    while (await chat(client, gw, stream=False))[0].status != 200:
        assert time.monotonic() < deadline, "still rejecting after redis came back"
        await asyncio.sleep(0.05)
    if kind == "concurrency":
        await gauges_return_to_zero(client, gw, name)


async def test_fail_open_admits_under_per_replica_limits_counts_and_re_registers_held_units(
    start_gateway, upstream, client, redis_server, caplog
):
    """With Redis gone, the global limit is enforced by this replica alone (capacity 1: a second
    stream waits), admissions are counted in one log line, and when Redis comes back the units
    still held are registered there again by the next lease renewal."""
    gates = Gates(upstream)
    name = unique("slots")
    top = state_yaml(redis_server.url, lease_ttl="600ms") + limits_yaml(
        slots_yaml(capacity=1, stream=1, unary=1, scope="global", name=name)
    )
    route = f"limits: [{name}]\ntimeouts: {{queue: 10s}}\n"
    gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
    sem = gw.runtime.admission.semaphores[name]

    await redis_server.stop()
    caplog.set_level(logging.WARNING, logger="streamgate.state")
    first = spawn(chat(client, gw))
    await upstream.wait_for_requests(1)  # admitted although Redis is down
    second = spawn(chat(client, gw))
    await eventually(lambda: sem.waiting == 1, what="second stream queued")  # capacity holds
    fail_open_lines = [r for r in caplog.records if "fail_open decided" in r.getMessage()]
    assert len(fail_open_lines) == 1

    await redis_server.start()
    deadline = time.monotonic() + 0.6 + DOWN_FOR_S + 2
    while await redis_leases(redis_server.url, name) != 1:  # the holder, renewed as an upsert
        assert time.monotonic() < deadline, "held units were not registered again"
        await asyncio.sleep(0.05)
    gates.open(0)
    assert (await first)[0].status == 200
    await upstream.wait_for_requests(2)  # the waiter got the unit back
    gates.open_all()
    assert (await second)[0].status == 200
    await gauges_return_to_zero(client, gw, name)
    await eventually(lambda: background_settled(gw), what="release reaching redis")
    assert await redis_leases(redis_server.url, name) == 0


async def test_leases_of_a_live_replica_outlast_the_ttl(start_gateway, upstream, client, redis_url):
    """Renewal keeps a long stream's units held in Redis well past one lease TTL."""
    gates = Gates(upstream)
    name = unique("slots")
    top = state_yaml(redis_url, lease_ttl="300ms") + limits_yaml(
        slots_yaml(capacity=1, stream=1, unary=1, scope="global", name=name)
    )
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    holder = spawn(chat(client, gw))
    await upstream.wait_for_requests(1)
    await asyncio.sleep(1.0)  # more than three TTLs
    assert await redis_leases(redis_url, name) == 1
    other = RedisState(StateConfig(backend="redis", redis_url=redis_url, lease_ttl=0.3))
    try:
        sem = GlobalSemaphore(name, ConcurrencyLimit(capacity=1), other, lambda s: None)
        with pytest.raises(Overloaded, match="waited"):  # another replica still cannot get in
            await sem.acquire(1, timeout=0.3)
    finally:
        await other.close()
    gates.open_all()
    assert (await holder)[0].status == 200
