"""Shared state that survives a Redis node: a Sentinel-managed master killed mid-run, and a
three-master Cluster, each with real servers on free ports and the real gateway in front."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from gateway.config.loader import load_config_text
from gateway.errors import ConfigErrors
from tests.conftest import config_yaml
from tests.support.redis_topology import RedisCluster3, SentinelGroup, poll
from tests.support.scripted_upstream import Respond, WaitFor, content, done, role_delta
from tests.test_admission import CHAT, chat

pytestmark = pytest.mark.redis

OK = Respond(sse=True, chunks=[role_delta(), content("ok"), done()])


def limits_top(url: str, rate: str, budget: str, slots: str, on_error: str) -> str:
    return (
        f"state: {{backend: redis, redis_url: '{url}', on_error: {on_error}, lease_ttl: 2s}}\n"
        "limits:\n"
        f"  rate:\n    {rate}: {{rate: 2, per: 1h, key: header:x-key, scope: global}}\n"
        f"  tokens:\n    {budget}: {{tokens: 100000, per: 1h, key: header:x-key, scope: global}}\n"
        f"  concurrency:\n    {slots}: {{capacity: 1, max_queue: 0, scope: global}}\n"
    )


def names() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"rate-{tag}", f"tpm-{tag}", f"slots-{tag}"


async def statuses(client, gw, key: str, n: int) -> list[int]:
    found = []
    for _ in range(n):
        resp, _ = await chat(client, gw, headers={"x-key": key})
        found.append(resp.status)
    return found


async def test_limits_are_still_enforced_after_the_sentinel_master_is_killed(
    start_gateway, upstream, client
):
    rate, budget, slots = names()
    upstream.default = OK
    with SentinelGroup() as group:
        await group.ready()
        top = limits_top(group.url, rate, budget, slots, on_error="fail_closed")
        route = f"limits: [{rate}, {budget}, {slots}]\n"
        gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
        assert await statuses(client, gw, "before", 3) == [200, 200, 429]

        group.kill_master()
        await group.failed_over()

        # fail_closed: 503 until the gateway's next try after the failure reaches the new
        # master (DOWN_FOR_S), then the limits answer again, without a restart.
        async def answered() -> int | None:
            resp, _ = await chat(client, gw, headers={"x-key": "after"})
            return None if resp.status == 503 else resp.status

        assert await poll(answered, timeout=5, what="the gateway reaching the new master") == 200
        assert await statuses(client, gw, "after", 2) == [200, 429]  # still 2 per hour
        assert gw.runtime.admission.shared_state.up
        await _concurrency_is_shared(client, gw, upstream)


async def test_global_limits_work_on_a_three_master_cluster(start_gateway, upstream, client):
    rate, budget, slots = names()
    upstream.default = OK
    with RedisCluster3() as cluster:
        await cluster.ready()
        top = limits_top(cluster.url, rate, budget, slots, on_error="fail_closed")
        route = f"limits: [{rate}, {budget}, {slots}]\n"
        gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
        # Keys spread over the three masters' slots; each is limited on its own.
        for i in range(6):
            assert await statuses(client, gw, f"tenant-{i}", 3) == [200, 200, 429], i
        await _concurrency_is_shared(client, gw, upstream)
        stored = set()
        for port in cluster.ports:
            async with Redis(port=port) as node:
                if await node.dbsize():
                    stored.add(port)
        assert len(stored) >= 2, "every key landed on one node: the test proves little"


async def _concurrency_is_shared(client, gw, upstream) -> None:
    """One unit: a stream holding it makes the next request 503 at once (max_queue 0)."""
    release = asyncio.Event()
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a"), WaitFor(release), done()])
    )
    async with client.post(gw.url + CHAT, json={"stream": True}, headers={"x-key": "c1"}) as held:
        await held.content.readuntil(b"a")
        resp, _ = await chat(client, gw, headers={"x-key": "c2"})
        assert resp.status == 503
        release.set()
        await held.read()


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis+sentinel://127.0.0.1:1", "name the master's service"),
        ("redis+sentinel://127.0.0.1/m", "'127.0.0.1' is not HOST:PORT"),
        ("redis+cluster://127.0.0.1:1/0", "a cluster URL has no path"),
        ("mongodb://127.0.0.1:1", "unknown scheme 'mongodb'"),
    ],
)
def test_a_bad_redis_url_is_a_config_error(url, message):
    text = config_yaml("http://127.0.0.1:1", top=f"state: {{backend: redis, redis_url: '{url}'}}\n")
    with pytest.raises(ConfigErrors) as raised:
        load_config_text(text, "gw.yaml", env={})
    assert any(f"state.redis_url: {message}" in str(e) for e in raised.value.errors), [
        str(e) for e in raised.value.errors
    ]
