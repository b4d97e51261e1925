"""A wait for one of an upstream's `max_connections` is a wait for capacity, not a slow backend
(issue 12, finding 8): its own condition `pool_exhausted` (503 with Retry-After), bounded by the
route's `timeouts.queue`, never eating into connect or first_chunk, with metrics of its own."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.config.loader import load_config_text
from gateway.engine.routing import RequestFacts
from gateway.explain import explain_lines
from tests.conftest import chat_body, config_yaml, http_upstream
from tests.support.scripted_upstream import (
    Respond,
    ScriptedUpstream,
    Sleep,
    WaitFor,
    content,
    done,
    role_delta,
    sse_tokens,
)

OK_STREAM = Respond(sse=True, chunks=sse_tokens(["ok "]))


async def _chat(client, gw) -> tuple[int, dict, bytes]:
    async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def _sample(gw, name: str, **labels: str) -> float:
    return gw.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


async def _holding_the_only_connection(client, gw, upstream, release: asyncio.Event):
    """Start a stream that keeps the upstream's one connection until `release` is set."""
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a "), WaitFor(release), done()])
    )
    task = asyncio.ensure_future(_chat(client, gw))
    await upstream.wait_for_requests(1)
    return task


async def test_a_full_pool_is_503_pool_exhausted_after_timeouts_queue(
    start_gateway, upstream, client
):
    cfg = config_yaml(
        upstream.url,
        upstream="max_connections: 1\n",
        route="timeouts: {queue: 200ms, connect: 100ms, first_chunk: 2s}\n",
    )
    gw = await start_gateway(cfg)
    release = asyncio.Event()
    first = await _holding_the_only_connection(client, gw, upstream, release)
    status, headers, body = await _chat(client, gw)
    assert status == 503, body
    assert json.loads(body)["error"]["type"] == "pool_exhausted"
    assert headers["Retry-After"] == "1"
    assert len(upstream.requests) == 1  # it never reached the upstream
    release.set()
    assert (await first)[0] == 200
    assert _sample(gw, "streamgate_upstream_pool_exhausted_total", upstream="up") == 1
    assert _sample(gw, "streamgate_upstream_pool_wait_seconds_count", upstream="up") == 2
    assert _sample(gw, "streamgate_upstream_pool_wait_seconds_sum", upstream="up") >= 0.2


async def test_the_wait_for_a_connection_does_not_eat_the_first_chunk_budget(
    start_gateway, upstream, client
):
    cfg = config_yaml(
        upstream.url,
        upstream="max_connections: 1\n",
        route="timeouts: {queue: 3s, connect: 100ms, first_chunk: 200ms}\n",
    )
    gw = await start_gateway(cfg)
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Sleep(0.5), done()]))
    upstream.default = OK_STREAM
    first = asyncio.ensure_future(_chat(client, gw))
    await upstream.wait_for_requests(1)
    status, _, body = await _chat(client, gw)  # waits ~0.5 s for the slot, then is served
    assert status == 200 and b"ok " in body
    assert (await first)[0] == 200
    assert _sample(gw, "streamgate_upstream_pool_wait_seconds_sum", upstream="up") >= 0.3


async def test_pool_exhausted_can_move_to_the_fallback(start_gateway, upstream, client):
    async with ScriptedUpstream() as fallback:
        fallback.default = OK_STREAM
        cfg = config_yaml(
            upstream.url,
            upstream="max_connections: 1\n",
            route=(
                "timeouts: {queue: 100ms}\n"
                "retry: {fallback_on: [pool_exhausted]}\n"
                "fallbacks: [backup]\n"
            ),
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        release = asyncio.Event()
        first = await _holding_the_only_connection(client, gw, upstream, release)
        status, _, body = await _chat(client, gw)
        assert status == 200 and b"ok " in body
        assert len(fallback.requests) == 1
        release.set()
        await first
        assert _sample(gw, "streamgate_retries_total", route="r", reason="pool_exhausted") == 1


@pytest.mark.parametrize("kind", ["http", "worker_pool"])
def test_explain_shows_the_connection_cap_and_the_outlier_policy(kind):
    text = config_yaml("http://127.0.0.1:1", upstream="max_connections: 64\n")
    if kind == "worker_pool":
        text = text.replace(
            '    kind: http\n    endpoints: [{url: "http://127.0.0.1:1"}]\n',
            '    kind: worker_pool\n    command: [fake, "{port}"]\n    count: 2\n',
        )
    config = load_config_text(text, "t.yaml", env={})
    facts = RequestFacts("POST", "/v1/chat/completions", {}, "m")
    lines = "\n".join(explain_lines(config, facts, stream=True))
    assert "at most 64 requests in flight" in lines, lines
    assert "pool_exhausted" in lines and "timeouts.queue 5s" in lines, lines
    assert "eject after 5 failures in a row" in lines and "panic below 50%" in lines, lines
