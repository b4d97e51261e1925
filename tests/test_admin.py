"""The admin listener as an operator reads it: config without secrets, live streams, health."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import chat_body, config_yaml
from tests.support.scripted_upstream import Respond, WaitFor, content, done, role_delta

SECRET = "sk-live-do-not-leak"
REDIS_PASSWORD = "hunter2-redis"


async def test_admin_config_shows_the_effective_config_with_secrets_redacted(
    start_gateway, upstream, client
):
    cfg = config_yaml(
        upstream.url,
        upstream=f'headers: {{Authorization: "Bearer {SECRET}", X-Org: "acme"}}\n',
        top=f'state: {{redis_url: "redis://user:{REDIS_PASSWORD}@127.0.0.1:6379/0"}}\n',
    )
    gw = await start_gateway(cfg)
    async with client.get(gw.admin_url + "/admin/config") as resp:
        text = await resp.text()
    assert resp.status == 200
    assert SECRET not in text and REDIS_PASSWORD not in text
    config = json.loads(text)
    assert config["upstreams"]["up"]["headers"] == {"Authorization": "<redacted>", "X-Org": "<redacted>"}
    assert config["state"]["redis_url"] == "redis://user:<redacted>@127.0.0.1:6379/0"
    assert config["routes"][0]["name"] == "r"
    assert config["routes"][0]["timeouts"]["chunk_gap"] == 30.0


async def test_admin_streams_lists_streams_in_flight(start_gateway, upstream, client):
    go_on = asyncio.Event()
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), WaitFor(go_on), done()]))
    gw = await start_gateway(config_yaml(upstream.url))
    async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
        await resp.content.readuntil(b"a ")
        async with client.get(gw.admin_url + "/admin/streams") as listing:
            streams = (await listing.json())["streams"]
        go_on.set()
        await resp.read()
    (stream,) = streams
    assert set(stream) == {
        "id", "route", "upstream", "endpoint", "age_s", "chunks", "bytes", "buffered_chunks",
        "protocol", "messages_in",
    }
    assert stream["id"] == resp.headers["x-request-id"]
    assert (stream["route"], stream["upstream"], stream["endpoint"]) == ("r", "up", upstream.url)
    assert stream["chunks"] == 2 and stream["bytes"] > 0 and stream["age_s"] >= 0
    async with client.get(gw.admin_url + "/admin/streams") as listing:
        assert (await listing.json()) == {"streams": []}


async def test_the_access_log_has_one_line_per_request_and_no_secrets(
    start_gateway, upstream, client, capsys
):
    upstream.script(Respond(json={"ok": True}))
    cfg = config_yaml(upstream.url, upstream=f'headers: {{Authorization: "Bearer {SECRET}"}}\n')
    gw = await start_gateway(cfg.replace("telemetry: {access_log: off}\n", ""))
    headers = {"Authorization": f"Bearer client-{SECRET}", "x-request-id": "req-42"}
    async with client.post(gw.url + "/v1/x?token=q", json=chat_body(stream=False), headers=headers) as r:
        await r.read()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    (line,) = lines
    assert SECRET not in line
    record = json.loads(line)
    assert record["request_id"] == "req-42"
    assert record["path"] == "/v1/x"  # the query string is left out: it may carry tokens
    assert (record["route"], record["upstream"], record["status"], record["outcome"]) == (
        "r", "up", 200, "completed",
    )
    assert record["attempts"] == 1 and record["bytes"] > 0


async def test_healthz_answers_while_the_process_runs(start_gateway, upstream, client):
    gw = await start_gateway(config_yaml(upstream.url))
    async with client.get(gw.admin_url + "/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"alive": True})
