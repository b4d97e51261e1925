"""Redis trouble is visible to operators: `streamgate_shared_state_up` drops to 0 and /readyz
names the outage while a real redis-server (on a free port) is killed, and both recover on
their own when it is back. /readyz stays 200 under either `on_error` policy: every replica
shares the one Redis, so taking pods out of rotation cannot route around it."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.admission.redis_state import DOWN_FOR_S
from tests.conftest import config_yaml
from tests.support.redis_server import RedisServer
from tests.support.scripted_upstream import Respond
from tests.test_admission import chat, limits_yaml
from tests.test_redis_limits import state_yaml, unique

OK_UNARY = Respond(json={"choices": [{"message": {"content": "ok"}}]})


async def shared_state_up(client, gw) -> float:
    async with client.get(gw.admin_url + "/metrics") as resp:
        text = await resp.text()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "streamgate_shared_state_up"]
    (sample,) = family.samples
    return sample.value


async def readyz(client, gw) -> tuple[int, dict]:
    async with client.get(gw.admin_url + "/readyz") as resp:
        return resp.status, await resp.json()


def degraded(reasons: list[str]) -> list[str]:
    return [r for r in reasons if r.startswith("shared state degraded")]


async def test_without_global_limits_shared_state_counts_as_up(start_gateway, upstream, client):
    upstream.default = OK_UNARY
    gw = await start_gateway(config_yaml(upstream.url))
    assert await shared_state_up(client, gw) == 1.0
    status, body = await readyz(client, gw)
    assert status == 200 and not degraded(body["reasons"])


@pytest.mark.redis
@pytest.mark.parametrize("on_error, status_while_down", [("fail_open", 200), ("fail_closed", 503)])
async def test_redis_outage_shows_in_gauge_and_readyz_and_clears_by_itself(
    start_gateway, upstream, client, on_error, status_while_down
):
    upstream.default = OK_UNARY
    name = unique("rate")
    with RedisServer() as redis_server:
        top = state_yaml(redis_server.url, on_error=on_error) + limits_yaml(
            rate=f"    {name}: {{rate: 1000, per: 1s, scope: global}}\n"
        )
        gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
        assert (await chat(client, gw, stream=False))[0].status == 200
        assert await shared_state_up(client, gw) == 1.0
        assert not degraded((await readyz(client, gw))[1]["reasons"])

        await redis_server.stop()
        assert (await chat(client, gw, stream=False))[0].status == status_while_down
        assert await shared_state_up(client, gw) == 0.0
        status, body = await readyz(client, gw)
        assert status == 200 and body["ready"] is True
        (reason,) = degraded(body["reasons"])
        assert f"redis at redis://127.0.0.1:{redis_server.port}/0" in reason and on_error in reason

        await redis_server.start()
        deadline = time.monotonic() + DOWN_FOR_S + 3
        # Only a call finds Redis back (fail_open admits meanwhile): keep sending requests.
        while (await chat(client, gw, stream=False))[0].status != 200 or (
            await shared_state_up(client, gw) != 1.0
        ):
            assert time.monotonic() < deadline, "still degraded after redis came back"
            await asyncio.sleep(0.05)
        assert not degraded((await readyz(client, gw))[1]["reasons"])
