"""A try that never reached a live server process costs no try (issue 12, finding 4).

A keep-alive connection that died while idle (a killed worker, a backend that restarted) and a
refused connection are retried at once on a fresh connection or another endpoint, without
consuming a `retry.attempts` try and, for the dead idle connection, without counting toward
ejection. A reset on a fresh connection is the backend's answer and follows the policy exactly.
"""

from __future__ import annotations

import json
import os
import signal
import socket

from tests.conftest import chat_body, config_yaml
from tests.support.scripted_upstream import ResetBeforeHeaders, Respond, sse_tokens
from tests.test_workers import eventually, gateway_yaml, get_json, worker_pool_of

OK_STREAM = Respond(sse=True, chunks=sse_tokens(["ok "]))
ONE_TRY = "retry: {attempts: 1}\n"


async def _chat(client, url: str) -> tuple[int, bytes]:
    async with client.post(url + "/v1/chat/completions", json=chat_body()) as resp:
        return resp.status, await resp.read()


def _sample(gw, name: str, **labels: str) -> float:
    return gw.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_dead_keep_alive_connection_is_retried_on_a_fresh_one(
    start_gateway, upstream, client
):
    upstream.script(OK_STREAM, ResetBeforeHeaders())  # the second request meets a dead socket
    upstream.default = OK_STREAM
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    assert (await _chat(client, gw.url))[0] == 200
    status, body = await _chat(client, gw.url)  # reuses the first request's connection
    assert status == 200 and b"ok " in body
    assert len(upstream.requests) == 3 and upstream.connections_accepted == 2
    assert _sample(gw, "streamgate_endpoint_ejections_total", upstream="up") == 0


async def test_a_reset_on_a_fresh_connection_follows_the_policy(start_gateway, upstream, client):
    upstream.script(ResetBeforeHeaders())
    upstream.default = OK_STREAM
    gw = await start_gateway(config_yaml(upstream.url, route=ONE_TRY))
    status, body = await _chat(client, gw.url)
    assert status == 502 and json.loads(body)["error"]["type"] == "upstream_reset"
    assert len(upstream.requests) == 1  # attempts: 1 means one request


async def test_a_refused_connection_moves_to_another_endpoint_without_using_a_try(
    start_gateway, upstream, client
):
    upstream.default = OK_STREAM
    dead = f"http://127.0.0.1:{_dead_port()}"
    cfg = config_yaml([dead, upstream.url], upstream="balance: round_robin\n", route=ONE_TRY)
    gw = await start_gateway(cfg)
    for _ in range(2):  # round robin turns twice per request: each starts on the dead one
        assert (await _chat(client, gw.url))[0] == 200
    assert len(upstream.requests) == 2
    assert _sample(gw, "streamgate_retries_total", route="r", reason="connect_error") == 2


async def test_a_killed_pool_worker_fails_no_request(start_gateway, client):
    gw = await start_gateway(gateway_yaml().replace("attempts: 3", "attempts: 1"))
    endpoints = worker_pool_of(gw).endpoints
    for round_ in range(2):
        await eventually(lambda: all(ep.healthy for ep in endpoints), 10, "both in rotation")
        for _ in range(4):  # both workers hold idle keep-alive connections from the gateway
            assert (await _chat(client, gw.url))[0] == 200
        _, env = await get_json(endpoints[round_].url + "/debug/env")
        os.kill(env["pid"], signal.SIGKILL)
        statuses = [(await _chat(client, gw.url))[0] for _ in range(4)]
        assert statuses == [200] * 4, f"round {round_}: {statuses}"
