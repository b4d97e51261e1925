"""Stream resilience, one scenario each: what the client saw, how many requests the upstream got,
and that nothing leaked (no open upstream connection, nothing left held)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.conftest import chat_body, config_yaml, http_upstream
from tests.support.scripted_upstream import (
    Close,
    NoResponse,
    Raw,
    Reset,
    ResetBeforeHeaders,
    Respond,
    ScriptedUpstream,
    Sleep,
    Stall,
    content,
    done,
    error_body,
    finish,
    role_delta,
    sse_tokens,
)

FAST_RETRY = "retry: {attempts: 3, backoff: {base: 1ms, max: 5ms, jitter: false}}\n"
OK_STREAM = Respond(sse=True, chunks=sse_tokens(["ok "]))


async def _chat(client, gw, stream=True, **extra) -> tuple[aiohttp.ClientResponse, bytes]:
    async with client.post(
        gw.url + "/v1/chat/completions", json=chat_body(stream, **extra)
    ) as resp:
        return resp, await resp.read()


async def _assert_nothing_held(gw, *upstreams: ScriptedUpstream) -> None:
    """No upstream connection is left in the middle of a response (idle pooled keep-alive
    connections are fine), and the gateway holds no stream, endpoint slot or unit."""
    for up in upstreams:
        await up.wait_until(
            lambda up=up: not any(c.mid_response for c in up._connections), 2, "idle connections"
        )
    runtime = gw.runtime
    assert runtime.streams == set()
    for pool in runtime.pools.values():
        assert all(ep.outstanding == 0 for ep in pool.endpoints)
    for sem in runtime.admission.semaphores.values():
        assert (sem.in_use, sem.waiting) == (0, 0)


# ----------------------------------------------------------------- retries before the first chunk


@pytest.mark.parametrize(
    "first, reason",
    [
        pytest.param(Respond(status=429, json={"error": {"message": "slow"}}), "429", id="429"),
        pytest.param(
            Respond(status=500, json={"error": {"message": "boom"}}), "500", id="500-once"
        ),
        pytest.param(ResetBeforeHeaders(), "reset", id="reset-before-headers"),
        pytest.param(Respond(status=200, sse=True, chunks=[]), "empty_body", id="empty-200"),
    ],
)
async def test_a_listed_failure_before_the_first_chunk_is_retried(
    start_gateway, upstream, client, first, reason
):
    upstream.script(first, OK_STREAM)
    gw = await start_gateway(config_yaml(upstream.url, route=FAST_RETRY))
    resp, body = await _chat(client, gw)
    assert resp.status == 200
    assert b"ok " in body and body.endswith(done())
    assert len(upstream.requests) == 2
    await _assert_nothing_held(gw, upstream)


async def test_retry_after_is_honoured_up_to_backoff_max(start_gateway, upstream, client):
    upstream.script(Respond(status=429, headers={"Retry-After": "30"}, body=b"{}"), OK_STREAM)
    route = "retry: {attempts: 2, backoff: {base: 1ms, max: 300ms, jitter: false}}\n"
    gw = await start_gateway(config_yaml(upstream.url, route=route))
    started = time.monotonic()
    resp, _ = await _chat(client, gw)
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert 0.3 <= elapsed < 5  # waited backoff.max, not the 30s the upstream asked for


async def test_persistent_429_returns_the_upstreams_last_answer(start_gateway, upstream, client):
    upstream.default = Respond(
        status=429, headers={"Retry-After": "1"}, body=error_body("slow down")
    )
    route = "retry: {attempts: 3, backoff: {base: 1ms, max: 1ms}}\n"
    gw = await start_gateway(config_yaml(upstream.url, route=route))
    resp, body = await _chat(client, gw)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "1"
    assert body == error_body("slow down")
    assert len(upstream.requests) == 3
    await _assert_nothing_held(gw, upstream)


async def test_persistent_503_moves_to_the_fallback(start_gateway, client):
    async with ScriptedUpstream() as primary, ScriptedUpstream() as fallback:
        primary.default = Respond(status=503, body=b"down")
        fallback.script(OK_STREAM)
        cfg = config_yaml(
            primary.url,
            route=FAST_RETRY + "fallbacks: [backup]\n",
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        resp, body = await _chat(client, gw)
        assert resp.status == 200 and b"ok " in body
        assert (len(primary.requests), len(fallback.requests)) == (3, 1)
        await _assert_nothing_held(gw, primary, fallback)


async def test_connection_refused_everywhere_is_502(start_gateway, client):
    gw = await start_gateway(config_yaml("http://127.0.0.1:9", route=FAST_RETRY))
    resp, body = await _chat(client, gw)
    assert resp.status == 502
    assert json.loads(body)["error"]["type"] == "upstream_unavailable"


async def test_no_response_at_all_is_a_first_chunk_timeout_504(start_gateway, upstream, client):
    upstream.default = NoResponse()
    route = (
        "timeouts: {first_chunk: 200ms}\n"
        "retry: {attempts: 2, backoff: {base: 1ms, max: 1ms}, on: [first_chunk_timeout], fallback_on: []}\n"
    )
    gw = await start_gateway(config_yaml(upstream.url, route=route))
    resp, body = await _chat(client, gw)
    assert resp.status == 504
    assert json.loads(body)["error"]["type"] == "upstream_timeout"
    assert len(upstream.requests) == 2
    await upstream.wait_for_closed_events(2)
    await _assert_nothing_held(gw, upstream)


async def test_role_only_delta_then_stall_is_failed_over(start_gateway, client):
    async with ScriptedUpstream() as primary, ScriptedUpstream() as fallback:
        primary.default = Respond(sse=True, chunks=[role_delta(), Stall()])
        fallback.script(OK_STREAM)
        cfg = config_yaml(
            primary.url,
            route="timeouts: {first_chunk: 200ms}\nfallbacks: [backup]\n"
            "retry: {fallback_on: [first_chunk_timeout]}\n",
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        resp, body = await _chat(client, gw)
        assert resp.status == 200
        assert body == b"".join(OK_STREAM.chunks)  # nothing of the primary's role delta
        assert (len(primary.requests), len(fallback.requests)) == (1, 1)
        await primary.wait_for_closed_events(1)
        await _assert_nothing_held(gw, primary, fallback)


@pytest.mark.parametrize("listed", [False, True], ids=["not-listed", "every-try-empty"])
async def test_empty_200_is_relayed_as_sent_when_not_retried(
    start_gateway, upstream, client, listed
):
    held_back = [role_delta(), finish(), done()]
    upstream.default = Respond(sse=True, chunks=held_back)
    on = "[empty_body]" if listed else "[503]"
    gw = await start_gateway(
        config_yaml(
            upstream.url,
            route=f"retry: {{attempts: 2, on: {on}, backoff: {{base: 1ms, max: 1ms}}}}\n",
        )
    )
    resp, body = await _chat(client, gw)
    assert resp.status == 200
    assert body == b"".join(held_back)
    assert len(upstream.requests) == (2 if listed else 1)


async def test_context_length_exceeded_goes_to_the_fallback_never_the_same_model(
    start_gateway, client
):
    async with ScriptedUpstream() as primary, ScriptedUpstream() as fallback:
        primary.default = Respond(
            status=400,
            body=error_body("too long", code="context_length_exceeded"),
            headers={"Content-Type": "application/json"},
        )
        fallback.script(OK_STREAM)
        cfg = config_yaml(
            primary.url,
            route=FAST_RETRY + "fallbacks: [backup]\n",
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        resp, _ = await _chat(client, gw)
        assert resp.status == 200
        assert (len(primary.requests), len(fallback.requests)) == (1, 1)


async def test_content_policy_400_passes_through_after_one_attempt(start_gateway, client):
    async with ScriptedUpstream() as primary, ScriptedUpstream() as fallback:
        policy_error = error_body("flagged", code="content_policy_violation")
        primary.default = Respond(
            status=400,
            body=policy_error,
            headers={"Content-Type": "application/json", "X-Upstream": "1"},
        )
        cfg = config_yaml(
            primary.url,
            route=FAST_RETRY + "fallbacks: [backup]\n",
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        resp, body = await _chat(client, gw)
        assert (resp.status, body, resp.headers["X-Upstream"]) == (400, policy_error, "1")
        assert (len(primary.requests), len(fallback.requests)) == (1, 0)


async def test_fallback_rewrites_the_model_and_the_response_names_the_fallbacks(
    start_gateway, client
):
    async with ScriptedUpstream() as primary, ScriptedUpstream() as fallback:
        primary.default = Respond(status=503, body=b"")
        fallback.script(Respond(sse=True, chunks=sse_tokens(["hi "], model="small-model")))
        cfg = config_yaml(
            primary.url,
            route="retry: {attempts: 1}\nfallbacks: [{upstream: backup, model: small-model}]\n",
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        resp, body = await _chat(client, gw, model="big-model")
        assert resp.status == 200
        (sent_primary,), (sent_fallback,) = primary.requests, fallback.requests
        assert sent_primary.json()["model"] == "big-model"
        assert sent_fallback.json() == {**sent_primary.json(), "model": "small-model"}
        assert b'"model":"small-model"' in body


async def test_the_request_body_is_replayed_identically(start_gateway, upstream, client):
    upstream.script(Respond(status=502, body=b""), OK_STREAM)
    gw = await start_gateway(config_yaml(upstream.url, route=FAST_RETRY))
    await _chat(client, gw)
    first, second = upstream.requests
    assert first.body == second.body and first.body


async def test_flapping_primary_is_ejected_then_used_again_after_cooldown(start_gateway, client):
    async with ScriptedUpstream() as primary, ScriptedUpstream() as fallback:
        primary.default = Respond(status=503, body=b"")
        fallback.default = OK_STREAM
        cfg = config_yaml(
            primary.url,
            upstream="eject: {consecutive_failures: 2, cooldown: 300ms}\n",
            route="retry: {attempts: 1}\nfallbacks: [backup]\n",
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        for _ in range(2):  # two failures eject the primary
            assert (await _chat(client, gw))[0].status == 200
        assert len(primary.requests) == 2
        for _ in range(3):  # during the outage: straight to the fallback
            assert (await _chat(client, gw))[0].status == 200
        assert len(primary.requests) == 2
        primary.default = OK_STREAM  # it recovers
        await asyncio.sleep(0.35)  # the cooldown is a span of time: let it pass
        assert (await _chat(client, gw))[0].status == 200
        assert len(primary.requests) == 3


# ----------------------------------------------------------------- after the commit point


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(Close(), id="cut-after-n-tokens"),
        pytest.param(Reset(), id="reset-after-n-tokens"),
        pytest.param(Stall(), id="stall-after-n-tokens"),
    ],
)
async def test_an_sse_stream_that_breaks_after_commit_ends_with_an_error_event(
    start_gateway, upstream, client, cut
):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), content("b "), cut]))
    route = "timeouts: {chunk_gap: 300ms}\n" + FAST_RETRY
    gw = await start_gateway(config_yaml(upstream.url, route=route))
    resp, body = await _chat(client, gw)
    assert resp.status == 200
    events = body.split(b"\n\n")
    assert b"a " in body and b"b " in body
    assert events[-2].startswith(b"event: error\ndata: ")
    assert b"[DONE]" not in body
    error = json.loads(events[-2].split(b"data: ", 1)[1])["error"]
    assert error["request_id"] == resp.headers["x-request-id"]
    assert len(upstream.requests) == 1  # never a retry after the commit point
    await _assert_nothing_held(gw, upstream)


async def test_a_non_sse_body_that_breaks_after_commit_is_an_incomplete_body(
    start_gateway, upstream, client
):
    upstream.script(
        Respond(headers={"Content-Type": "application/x-ndjson"}, chunks=[b'{"a":1}\n', Close()])
    )
    gw = await start_gateway(config_yaml(upstream.url, route=FAST_RETRY))
    async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert len(upstream.requests) == 1


async def test_malformed_sse_chunk_is_relayed_and_the_stream_goes_on(
    start_gateway, upstream, client
):
    chunks = [role_delta(), content("a "), b"data: {not json\n\n", content("b "), done()]
    upstream.script(Respond(sse=True, chunks=chunks))
    gw = await start_gateway(config_yaml(upstream.url))
    resp, body = await _chat(client, gw)
    assert body == b"".join(chunks)


async def test_missing_done_ends_when_the_upstream_body_ends(start_gateway, upstream, client):
    chunks = [role_delta(), content("a "), finish()]
    upstream.script(Respond(sse=True, chunks=chunks))
    gw = await start_gateway(config_yaml(upstream.url))
    resp, body = await _chat(client, gw)
    assert body == b"".join(chunks)


async def test_malformed_chunk_size_mid_body_ends_the_stream_visibly(
    start_gateway, upstream, client
):
    # aiohttp's C parser may close without raising on this; chunk_gap must still end it.
    event = content("a ")
    upstream.script(
        Respond(
            sse=True,
            chunked=False,
            headers={"Transfer-Encoding": "chunked"},
            chunks=[
                Raw(f"{len(role_delta()):x}\r\n".encode() + role_delta() + b"\r\n"),
                Raw(f"{len(event):x}\r\n".encode() + event + b"\r\n"),
                Sleep(0.05),
                Raw(b"zz-not-hex\r\nboom\r\n"),
                Stall(),
            ],
        )
    )
    gw = await start_gateway(config_yaml(upstream.url, route="timeouts: {chunk_gap: 300ms}\n"))
    resp, body = await _chat(client, gw)
    assert b"a " in body
    assert b"event: error" in body and b"[DONE]" not in body


async def test_a_long_healthy_stream_never_hits_chunk_gap(start_gateway, upstream, client):
    chunks = [role_delta()]
    for i in range(8):
        chunks += [Sleep(0.1), content(f"t{i} ")]
    chunks.append(done())
    upstream.script(Respond(sse=True, chunks=chunks))
    gw = await start_gateway(config_yaml(upstream.url, route="timeouts: {chunk_gap: 250ms}\n"))
    resp, body = await _chat(client, gw)
    assert body.endswith(done()) and b"event: error" not in body


async def test_keepalive_comments_fill_upstream_silence(start_gateway, upstream, client):
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a "), Sleep(0.35), content("b "), done()])
    )
    gw = await start_gateway(
        config_yaml(upstream.url, route="keepalive: 100ms\ntimeouts: {chunk_gap: 10s}\n")
    )
    resp, body = await _chat(client, gw)
    assert body.count(b": keepalive\n\n") >= 2
    assert body.replace(b": keepalive\n\n", b"") == b"".join(
        [role_delta(), content("a "), content("b "), done()]
    )


async def test_keepalives_do_not_reset_chunk_gap(start_gateway, upstream, client):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]))
    gw = await start_gateway(
        config_yaml(upstream.url, route="keepalive: 50ms\ntimeouts: {chunk_gap: 400ms}\n")
    )
    started = time.monotonic()
    resp, body = await _chat(client, gw)
    assert b": keepalive" in body and body.rstrip().split(b"\n\n")[-1].startswith(b"event: error")
    assert time.monotonic() - started < 3


# ----------------------------------------------------------------- client disconnects


async def _disconnect_after(client_task: asyncio.Task, upstream: ScriptedUpstream, n_requests: int):
    await upstream.wait_for_requests(n_requests, timeout=5)
    client_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client_task


async def test_disconnect_while_waiting_for_the_first_chunk_closes_the_upstream(
    start_gateway, upstream, client
):
    upstream.script(Respond(sse=True, chunks=[role_delta(), Stall()]))
    gw = await start_gateway(config_yaml(upstream.url))
    task = asyncio.create_task(_chat(client, gw))
    await _disconnect_after(task, upstream, 1)
    (event,) = await upstream.wait_for_closed_events(1, timeout=2)
    assert event.mid_response
    await _assert_nothing_held(gw, upstream)


async def test_disconnect_mid_stream_closes_the_upstream(start_gateway, upstream, client):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]))
    gw = await start_gateway(config_yaml(upstream.url))

    async def read_then_leave():
        async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
            await resp.content.readuntil(b"a ")
        # leaving the block releases (closes) the half-read connection

    await read_then_leave()
    (event,) = await upstream.wait_for_closed_events(1, timeout=2)
    assert event.mid_response
    await _assert_nothing_held(gw, upstream)


async def test_disconnect_waiting_on_a_unary_body_closes_the_upstream(
    start_gateway, upstream, client
):
    upstream.script(NoResponse())
    gw = await start_gateway(config_yaml(upstream.url))
    task = asyncio.create_task(_chat(client, gw, stream=False))
    await _disconnect_after(task, upstream, 1)
    await upstream.wait_for_closed_events(1, timeout=2)
    await _assert_nothing_held(gw, upstream)


async def test_disconnect_while_queued_for_admission_releases_its_place(
    start_gateway, upstream, client
):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]))
    cfg = config_yaml(
        upstream.url,
        route="limits: [slots]\n",
        top="limits:\n  concurrency:\n    slots: {capacity: 1, weights: {stream: 1, unary: 1}}\n",
    )
    gw = await start_gateway(cfg)
    holder = asyncio.create_task(_chat(client, gw))
    await upstream.wait_for_requests(1)
    queued = asyncio.create_task(_chat(client, gw))
    semaphore = gw.runtime.admission.semaphores["slots"]
    async with asyncio.timeout(2):
        while semaphore.waiting == 0:
            await asyncio.sleep(0.01)
    queued.cancel()
    async with asyncio.timeout(2):
        while semaphore.waiting:
            await asyncio.sleep(0.01)
    assert len(upstream.requests) == 1  # the queued request never reached the upstream
    holder.cancel()
    await upstream.wait_for_closed_events(1)
    async with asyncio.timeout(2):
        while semaphore.in_use:
            await asyncio.sleep(0.01)
    await _assert_nothing_held(gw, upstream)


# ----------------------------------------------------------------- backpressure


async def test_slow_client_gets_backpressure_and_memory_stays_bounded(
    start_gateway, upstream, client
):
    """A 50 MiB response to a client that reads slowly: the upstream's writes block instead of
    the gateway buffering; what the gateway has taken stays within its bound plus sockets."""
    chunk = b"x" * 65536
    upstream.script(
        Respond(headers={"Content-Type": "application/octet-stream"}, chunks=[chunk] * 800)
    )
    gw = await start_gateway(
        config_yaml(upstream.url, route="buffer: {chunks: 8, bytes: 256KiB}\n")
    )
    received = 0
    async with client.post(gw.url + "/v1/x", json=chat_body(stream=True)) as resp:
        while received < 4 * 1024 * 1024:  # read 4 MiB, slowly
            received += len(await resp.content.read(65536))
            await asyncio.sleep(0.001)
        (sent,) = upstream.requests
        (ctx,) = gw.runtime.streams
        # Kernel socket buffers on loopback hold a few MiB each way; 50 MiB never moves.
        assert ctx.bytes - received < 12 * 1024 * 1024
        assert sent.response_bytes < received + 16 * 1024 * 1024
    await _assert_nothing_held(gw, upstream)


async def test_a_client_that_stops_reading_is_aborted_after_slow_client(
    start_gateway, upstream, client
):
    upstream.default = Respond(
        headers={"Content-Type": "application/octet-stream"}, chunks=[b"x" * 65536] * 800
    )
    gw = await start_gateway(
        config_yaml(upstream.url, route="timeouts: {slow_client: 300ms}\nbuffer: {bytes: 64KiB}\n")
    )
    async with client.post(gw.url + "/v1/x", json=chat_body(stream=True)) as resp:
        assert resp.status == 200
        await upstream.wait_for_closed_events(1, timeout=5)  # the gateway gave up on us
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    await _assert_nothing_held(gw, upstream)


async def test_crlf_separated_sse_commits_on_content_and_is_relayed_as_sent(
    start_gateway, upstream, client
):
    crlf = [e.replace(b"\n\n", b"\r\n\r\n") for e in (role_delta(), content("a "), done())]
    upstream.script(Respond(sse=True, chunks=[crlf[0][:10], crlf[0][10:], crlf[1], crlf[2]]))
    gw = await start_gateway(config_yaml(upstream.url))
    resp, body = await _chat(client, gw)
    assert body == b"".join(crlf)


async def test_a_get_is_tried_exactly_as_often_as_the_policy_says(start_gateway, upstream, client):
    upstream.default = ResetBeforeHeaders()
    gw = await start_gateway(config_yaml(upstream.url, route="retry: {attempts: 1}\n"))
    async with client.get(gw.url + "/v1/models") as resp:
        assert resp.status == 502
    assert len(upstream.requests) == 1
