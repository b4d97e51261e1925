"""Active health checks: an endpoint failing its probes leaves rotation and comes back."""

from __future__ import annotations

import asyncio

from tests.conftest import chat_body, config_yaml
from tests.support.scripted_upstream import Respond, ScriptedUpstream


def _health_aware(up: ScriptedUpstream, healthy: dict[str, bool], name: str):
    def answer(request):
        if request.path == "/health":
            return Respond(status=200 if healthy[name] else 503, body=b"")
        return Respond(json={"served_by": name})

    return answer


async def test_an_unhealthy_endpoint_is_skipped_and_returns_after_it_recovers(
    start_gateway, client
):
    healthy = {"a": True, "b": True}
    async with ScriptedUpstream() as a, ScriptedUpstream() as b:
        a.default = _health_aware(a, healthy, "a")
        b.default = _health_aware(b, healthy, "b")
        cfg = config_yaml(
            [a.url, b.url],
            upstream="balance: round_robin\nhealth: {path: /health, interval: 50ms, unhealthy_after: 2}\n",
        )
        gw = await start_gateway(cfg)
        endpoint_a = next(ep for ep in gw.runtime.pools["up"].endpoints if ep.url == a.url)

        async def wait_for(state: bool) -> None:
            async with asyncio.timeout(3):
                while endpoint_a.healthy is not state:
                    await asyncio.sleep(0.02)

        healthy["a"] = False
        await wait_for(False)
        served = []
        for _ in range(4):
            async with client.post(gw.url + "/v1/x", json=chat_body(stream=False)) as resp:
                served.append((await resp.json())["served_by"])
        assert served == ["b"] * 4
        async with client.get(gw.admin_url + "/metrics") as resp:
            text = await resp.text()
        assert f'streamgate_endpoint_healthy{{endpoint="{a.url}",upstream="up"}} 0.0' in text

        healthy["a"] = True
        await wait_for(True)
        served = []
        for _ in range(4):
            async with client.post(gw.url + "/v1/x", json=chat_body(stream=False)) as resp:
                served.append((await resp.json())["served_by"])
        assert sorted(served) == ["a", "a", "b", "b"]


async def test_readyz_fails_when_no_upstream_has_an_endpoint_in_rotation(start_gateway, client):
    async with ScriptedUpstream() as a:
        a.default = Respond(status=503, body=b"")
        gw = await start_gateway(
            config_yaml(
                a.url, upstream="health: {path: /health, interval: 50ms, unhealthy_after: 1}\n"
            )
        )
        async with asyncio.timeout(3):
            while True:
                async with client.get(gw.admin_url + "/readyz") as resp:
                    if resp.status == 503:
                        body = await resp.json()
                        break
                await asyncio.sleep(0.02)
        assert body["ready"] is False
        assert body["reasons"][0] == "no upstream has an endpoint in rotation"
        # Issue 12: panic is reported too (the lone endpoint is still tried, not refused).
        assert body["reasons"][1:] == [
            "up: panic, 0 of 1 endpoints in rotation (panic_threshold 50%);"
            " balancing across all of them"
        ]
