"""Metrics as an operator scrapes them: after scripted traffic, `/metrics` on the admin listener
holds exactly the series SPEC section 6 names, with exactly these counts and label sets, and no
label value ever comes from request data."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.config.loader import load_config
from tests.conftest import chat_body, config_yaml, http_upstream
from tests.support.scripted_upstream import (
    Close,
    NoResponse,
    Reset,
    ResetBeforeHeaders,
    Respond,
    ScriptedUpstream,
    Sleep,
    Stall,
    WaitFor,
    content,
    done,
    role_delta,
    sse_tokens,
    usage_chunk,
)

FAST_RETRY = "retry: {attempts: 3, backoff: {base: 1ms, max: 5ms, jitter: false}}\n"
OK_STREAM = Respond(sse=True, chunks=sse_tokens(["ok "]))
CHAT = "/v1/chat/completions"


# ----------------------------------------------------------------- reading /metrics


class Scrape:
    """One `/metrics` exposition, flattened to {sample name: {"k=v,...": value}}."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._samples: dict[str, dict[str, float]] = {}
        self.label_values: set[str] = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = {k: v for k, v in sample.labels.items() if k != "le"}
                self.label_values.update(labels.values())
                key = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
                if "le" in sample.labels:
                    le = f"le={float(sample.labels['le'])!r}"
                    key = f"{key},{le}" if key else le
                self._samples.setdefault(sample.name, {})[key] = sample.value

    def __call__(self, name: str) -> dict[str, float]:
        """Every series of one sample name, e.g. scrape("streamgate_requests_total")."""
        return self._samples.get(name, {})

    def value(self, name: str, labels: str) -> float:
        return self(name)[labels]

    def bucket(self, name: str, labels: str, le: float) -> float:
        return self(name + "_bucket")[f"{labels},le={float(le)!r}"]


async def scrape(client: aiohttp.ClientSession, admin_url: str) -> Scrape:
    async with client.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return Scrape(await resp.text())


class Observed:
    """Counts the requests the gateway has finished (metrics recorded, access log written).

    `Runtime.observe` runs in the handler's `finally`, which may come after the client has
    read the last byte; waiting on it (not on the client) makes every count below exact.
    """

    def __init__(self, runtime) -> None:
        self.count = 0
        self._changed = asyncio.Event()
        observe = runtime.observe

        def counting(ctx) -> None:
            observe(ctx)
            self.count += 1
            self._changed.set()

        runtime.observe = counting

    async def wait(self, n: int, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while self.count < n:
                self._changed.clear()
                await self._changed.wait()


async def start(start_gateway, yaml_text: str):
    gw = await start_gateway(yaml_text)
    return gw, Observed(gw.runtime)


async def eventually(predicate, timeout: float = 2, what: str = "condition") -> None:
    """Bounded wait for state that has no event of its own (a queued waiter)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout}s") from None


async def _chat(client, url: str, stream: bool = True, **kw) -> tuple[int, bytes]:
    async with client.post(url + CHAT, json=chat_body(stream), **kw) as resp:
        return resp.status, await resp.read()


def _dead_port() -> int:
    """A local port that refuses connections (bound once, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


R = "route=r"
R_UP = "route=r,upstream=up"
STREAM_200 = "route=r,status=200,stream=true,upstream=up"


# ----------------------------------------------------------------- a healthy stream


async def test_a_completed_stream_is_counted_once_with_config_labels(
    start_gateway, upstream, client
):
    go = [asyncio.Event() for _ in range(3)]
    upstream.script(
        Respond(
            sse=True,
            chunks=[
                role_delta(),
                content("a "),
                WaitFor(go[0]),
                content("b "),
                WaitFor(go[1]),
                Sleep(0.3),
                usage_chunk(prompt=7, completion=3),
                WaitFor(go[2]),
                done(),
            ],
        )
    )
    gw, observed = await start(start_gateway, config_yaml(upstream.url))
    async with client.post(gw.url + CHAT, json=chat_body()) as resp:
        # Lock-step: the upstream sends each item only once the client has seen the one
        # before, so the gateway reads each one on its own and the chunk-gap count is exact.
        await resp.content.readuntil(b"a ")
        during = await scrape(client, gw.admin_url)
        go[0].set()
        await resp.content.readuntil(b"b ")
        go[1].set()
        await resp.content.readuntil(b'"total_tokens":10}')
        go[2].set()
        await resp.read()
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)

    assert during("streamgate_active_streams") == {R: 1.0}
    assert during("streamgate_requests_total") == {}  # counted when it ends, not before
    assert s("streamgate_active_streams") == {R: 0.0}
    assert s("streamgate_requests_total") == {STREAM_200: 1.0}
    assert s("streamgate_time_to_first_chunk_seconds_count") == {R_UP: 1.0}
    assert s("streamgate_stream_duration_seconds_count") == {"outcome=completed,route=r": 1.0}
    assert s.value("streamgate_stream_duration_seconds_sum", "outcome=completed,route=r") >= 0.3
    # role+a (one read, the head), b, usage, [DONE]: four reads, so three gaps between them
    # (the end of the body is not a chunk); the 0.3 s sleep is the only gap over 250 ms.
    assert s("streamgate_chunk_gap_seconds_count") == {R: 3.0}
    assert s.bucket("streamgate_chunk_gap_seconds", R, 0.25) == 2.0
    assert s.bucket("streamgate_chunk_gap_seconds", R, float("inf")) == 3.0
    assert s.value("streamgate_chunk_gap_seconds_sum", R) >= 0.3
    # Chunks are SSE events: role, a, b, usage, [DONE].
    assert s("streamgate_chunks_per_stream_count") == {R: 1.0}
    assert s("streamgate_chunks_per_stream_sum") == {R: 5.0}
    assert s("streamgate_tokens_total") == {
        "route=r,type=completion,upstream=up": 3.0,
        "route=r,type=prompt,upstream=up": 7.0,
    }
    assert s("streamgate_output_tokens_per_second_count") == {R_UP: 1.0}
    assert s("streamgate_upstream_attempts_total") == {"outcome=ok,upstream=up": 1.0}
    assert s("streamgate_endpoint_healthy") == {f"endpoint={upstream.url},upstream=up": 1.0}
    for quiet in (
        "streamgate_retries_total",
        "streamgate_stream_errors_total",
        "streamgate_client_disconnects_total",
        "streamgate_backpressure_stalls_total",
        "streamgate_config_reloads_total",
        "streamgate_concurrency_in_use",  # no concurrency limit configured
    ):
        assert s(quiet) == {}, quiet


async def test_a_unary_answer_is_counted_with_stream_false(start_gateway, upstream, client):
    answer = {"id": "x", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    upstream.script(Respond(json=answer))
    gw, observed = await start(start_gateway, config_yaml(upstream.url))
    assert (await _chat(client, gw.url, stream=False))[0] == 200
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {
        "route=r,status=200,stream=false,upstream=up": 1.0
    }
    assert s("streamgate_time_to_first_chunk_seconds_count") == {R_UP: 1.0}
    assert s("streamgate_stream_duration_seconds_count") == {"outcome=completed,route=r": 1.0}
    assert s("streamgate_chunks_per_stream_sum") == {R: 1.0}  # a whole body is one chunk
    assert s("streamgate_chunk_gap_seconds_count") == {}  # no stream, no gaps
    assert s("streamgate_tokens_total") == {
        "route=r,type=completion,upstream=up": 2.0,
        "route=r,type=prompt,upstream=up": 5.0,
    }
    assert s("streamgate_output_tokens_per_second_count") == {}  # a rate needs a stream
    assert s("streamgate_active_streams") == {R: 0.0}


# ----------------------------------------------------------------- streams that end badly


@pytest.mark.parametrize(
    "cut, route, kind, outcome",
    [
        pytest.param(Reset(), "", "reset", "upstream_error", id="reset"),
        pytest.param(Close(), "", "reset", "upstream_error", id="truncated-chunked-body"),
        pytest.param(
            Stall(), "timeouts: {chunk_gap: 200ms}\n", "chunk_gap_timeout", "timeout",
            id="chunk-gap",
        ),
        pytest.param(
            Stall(), "timeouts: {chunk_gap: 10s, total: 400ms}\n", "total_timeout", "timeout",
            id="total",
        ),
    ],
)
async def test_a_stream_error_after_commit_is_counted_by_kind_and_outcome(
    start_gateway, upstream, client, cut, route, kind, outcome
):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), cut]))
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=route))
    status, body = await _chat(client, gw.url)
    assert status == 200 and b"event: error" in body
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {STREAM_200: 1.0}
    assert s("streamgate_stream_errors_total") == {f"kind={kind},route=r": 1.0}
    assert s("streamgate_stream_duration_seconds_count") == {f"outcome={outcome},route=r": 1.0}
    assert s("streamgate_upstream_attempts_total") == {"outcome=ok,upstream=up": 1.0}
    assert s("streamgate_retries_total") == {}  # never after the commit point
    assert s("streamgate_client_disconnects_total") == {}
    assert s("streamgate_active_streams") == {R: 0.0}


async def _never_read(client, gw, observed) -> None:
    async with client.post(gw.url + "/v1/x", json=chat_body()) as resp:
        assert resp.status == 200
        await observed.wait(1)  # never read: the gateway gives up on us


async def test_a_client_that_stops_reading_is_one_backpressure_stall_then_slow_client(
    start_gateway, upstream, client
):
    # Small events, paced, so every read and write is far below aiohttp's own 64 KiB write
    # limit: the gateway's bounded buffer is what fills, and the pump stops reading.
    paced = [role_delta()]
    for _ in range(2000):
        paced += [content("x" * 16000), Sleep(0.001)]
    upstream.default = Respond(sse=True, chunks=paced)
    route = "timeouts: {slow_client: 300ms}\nbuffer: {chunks: 2}\n"
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=route))
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:  # a client with a tiny receive window that never reads
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        host, port = gw.url.removeprefix("http://").split(":")
        await loop.sock_connect(sock, (host, int(port)))
        body = b'{"model": "m", "stream": true}'
        head = (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        await loop.sock_sendall(sock, head.encode() + body)
        await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {STREAM_200: 1.0}
    # The client never drains, so the first stall is also the last: slow_client ends it.
    assert s("streamgate_backpressure_stalls_total") == {R: 1.0}
    assert s("streamgate_stream_errors_total") == {"kind=slow_client,route=r": 1.0}
    assert s("streamgate_stream_duration_seconds_count") == {"outcome=slow_client,route=r": 1.0}
    assert s("streamgate_active_streams") == {R: 0.0}


async def test_a_stall_inside_a_large_write_is_counted(start_gateway, upstream, client):
    upstream.default = Respond(
        headers={"Content-Type": "application/octet-stream"}, chunks=[b"x" * 256 * 1024] * 200
    )
    route = "timeouts: {slow_client: 300ms}\n"
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=route))
    await _never_read(client, gw, observed)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_stream_errors_total") == {"kind=slow_client,route=r": 1.0}
    assert s.value("streamgate_backpressure_stalls_total", R) >= 1


# ----------------------------------------------------------------- clients that go away


async def test_a_client_that_leaves_mid_stream_is_a_499_and_a_disconnect(
    start_gateway, upstream, client
):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]))
    gw, observed = await start(start_gateway, config_yaml(upstream.url))
    async with client.post(gw.url + CHAT, json=chat_body()) as resp:
        await resp.content.readuntil(b"a ")
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {"route=r,status=499,stream=true,upstream=up": 1.0}
    assert s("streamgate_client_disconnects_total") == {R: 1.0}
    assert s("streamgate_stream_duration_seconds_count") == {
        "outcome=client_disconnect,route=r": 1.0
    }
    assert s("streamgate_time_to_first_chunk_seconds_count") == {R_UP: 1.0}
    assert s("streamgate_stream_errors_total") == {}  # the client's doing, not an error
    assert s("streamgate_active_streams") == {R: 0.0}


async def test_a_client_that_leaves_before_the_first_chunk_is_not_a_stream(
    start_gateway, upstream, client
):
    upstream.script(Respond(sse=True, chunks=[role_delta(), Stall()]))
    gw, observed = await start(start_gateway, config_yaml(upstream.url))
    task = asyncio.create_task(_chat(client, gw.url))
    await upstream.wait_for_requests(1)
    task.cancel()
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {"route=r,status=499,stream=true,upstream=up": 1.0}
    assert s("streamgate_client_disconnects_total") == {R: 1.0}
    for not_committed in (
        "streamgate_time_to_first_chunk_seconds_count",
        "streamgate_stream_duration_seconds_count",
        "streamgate_chunks_per_stream_count",
        "streamgate_active_streams",
    ):
        assert s(not_committed) == {}, not_committed


# ----------------------------------------------------------------- upstream attempts and retries


def _two_endpoints(dead: str, live: str, route: str = FAST_RETRY, upstream: str = "") -> str:
    return config_yaml([dead, live], route=route, upstream="balance: round_robin\n" + upstream)


@pytest.mark.parametrize(
    "first, route, attempt_outcome, reason",
    [
        pytest.param(
            Respond(status=429, body=b"{}"), FAST_RETRY, "upstream_error", "429", id="429"
        ),
        pytest.param(Respond(status=502, body=b""), FAST_RETRY, "upstream_error", "502", id="502"),
        pytest.param(ResetBeforeHeaders(), FAST_RETRY, "upstream_error", "reset", id="reset"),
        pytest.param(
            Respond(sse=True, chunks=[]), FAST_RETRY, "upstream_error", "empty_body", id="empty"
        ),
        pytest.param(
            NoResponse(),
            "timeouts: {connect: 100ms, first_chunk: 200ms}\n"
            "retry: {attempts: 2, backoff: {base: 1ms, max: 1ms}, on: [first_chunk_timeout],"
            " fallback_on: []}\n",
            "timeout",
            "first_chunk_timeout",
            id="first-chunk-timeout",
        ),
    ],
)
async def test_a_retried_failure_counts_one_attempt_and_one_retry(
    start_gateway, upstream, client, first, route, attempt_outcome, reason
):
    upstream.script(first, OK_STREAM)
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=route))
    assert (await _chat(client, gw.url))[0] == 200
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {STREAM_200: 1.0}
    assert s("streamgate_upstream_attempts_total") == {
        f"outcome={attempt_outcome},upstream=up": 1.0,
        "outcome=ok,upstream=up": 1.0,
    }
    assert s("streamgate_retries_total") == {f"reason={reason},route=r": 1.0}


async def test_a_connect_error_is_an_attempt_outcome_and_a_retry_reason(
    start_gateway, upstream, client
):
    upstream.script(OK_STREAM)
    dead = f"http://127.0.0.1:{_dead_port()}"
    gw, observed = await start(start_gateway, _two_endpoints(dead, upstream.url))
    assert (await _chat(client, gw.url))[0] == 200
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_upstream_attempts_total") == {
        "outcome=connect_error,upstream=up": 1.0,
        "outcome=ok,upstream=up": 1.0,
    }
    assert s("streamgate_retries_total") == {"reason=connect_error,route=r": 1.0}
    assert s("streamgate_requests_total") == {STREAM_200: 1.0}


async def test_an_ejected_endpoint_reads_unhealthy(start_gateway, upstream, client):
    upstream.script(OK_STREAM)
    dead = f"http://127.0.0.1:{_dead_port()}"
    eject = "eject: {consecutive_failures: 1, cooldown: 60s}\n"
    gw, observed = await start(start_gateway, _two_endpoints(dead, upstream.url, upstream=eject))
    assert (await _chat(client, gw.url))[0] == 200
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_endpoint_healthy") == {
        f"endpoint={dead},upstream=up": 0.0,
        f"endpoint={upstream.url},upstream=up": 1.0,
    }


async def test_moving_to_a_fallback_counts_as_a_retry(start_gateway, client):
    async with ScriptedUpstream() as primary, ScriptedUpstream() as fallback:
        primary.default = Respond(status=503, body=b"down")
        fallback.script(OK_STREAM)
        cfg = config_yaml(
            primary.url,
            route=FAST_RETRY + "fallbacks: [backup]\n",
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw, observed = await start(start_gateway, cfg)
        assert (await _chat(client, gw.url))[0] == 200
        await observed.wait(1)
        s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {
        "route=r,status=200,stream=true,upstream=backup": 1.0
    }
    assert s("streamgate_upstream_attempts_total") == {
        "outcome=upstream_error,upstream=up": 3.0,
        "outcome=ok,upstream=backup": 1.0,
    }
    # Two retries on `up`, then the move to `backup`.
    assert s("streamgate_retries_total") == {"reason=503,route=r": 3.0}
    assert s("streamgate_time_to_first_chunk_seconds_count") == {"route=r,upstream=backup": 1.0}


async def test_the_last_failed_try_is_not_counted_as_a_retry(start_gateway, upstream, client):
    upstream.default = Respond(status=503, body=b"down")
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=FAST_RETRY))
    assert (await _chat(client, gw.url))[0] == 503
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert len(upstream.requests) == 3
    assert s("streamgate_upstream_attempts_total") == {"outcome=upstream_error,upstream=up": 3.0}
    assert s("streamgate_retries_total") == {"reason=503,route=r": 2.0}


async def test_an_upstream_status_passed_through_is_an_upstream_error_attempt(
    start_gateway, upstream, client
):
    upstream.script(Respond(status=400, json={"error": {"message": "bad"}}))
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=FAST_RETRY))
    assert (await _chat(client, gw.url))[0] == 400
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {"route=r,status=400,stream=true,upstream=up": 1.0}
    assert s("streamgate_upstream_attempts_total") == {"outcome=upstream_error,upstream=up": 1.0}
    assert s("streamgate_retries_total") == {}


@pytest.mark.parametrize(
    "answer, status",
    [
        pytest.param(Respond(status=503, body=b"down"), 503, id="503-after-retries"),
        pytest.param(Respond(status=400, json={"error": {"message": "bad"}}), 400, id="400"),
    ],
)
async def test_a_relayed_upstream_error_status_has_outcome_upstream_error(
    start_gateway, upstream, client, answer, status
):
    upstream.default = answer
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=FAST_RETRY))
    assert (await _chat(client, gw.url))[0] == status
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    outcomes = s("streamgate_stream_duration_seconds_count")
    assert "outcome=completed,route=r" not in outcomes
    assert outcomes == {"outcome=upstream_error,route=r": 1.0}


async def test_first_chunk_timeout_counts_from_the_request_sent(start_gateway, upstream, client):
    upstream.default = NoResponse()
    route = (
        "timeouts: {connect: 2s, first_chunk: 200ms}\n"
        "retry: {attempts: 1, on: [], fallback_on: []}\n"
    )
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=route))
    started = asyncio.get_running_loop().time()
    assert (await _chat(client, gw.url))[0] == 504
    elapsed = asyncio.get_running_loop().time() - started
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_upstream_attempts_total") == {"outcome=timeout,upstream=up": 1.0}
    assert elapsed < 1.0, f"gave up after {elapsed:.2f}s; first_chunk is 200ms"


# ----------------------------------------------------------------- admission


LIMITED = (
    "limits:\n"
    "  concurrency:\n"
    "    slots: {capacity: 3, weights: {stream: 2, unary: 1}, max_queue: 5}\n"
    "  rate:\n"
    "    per-route: {rate: 1, per: 60s, key: route}\n"
)


async def test_concurrency_gauges_show_units_in_use_capacity_and_the_queue(
    start_gateway, client
):
    async with ScriptedUpstream() as up:
        release = asyncio.Event()
        up.script(
            Respond(sse=True, chunks=[role_delta(), content("a "), WaitFor(release), done()]),
            OK_STREAM,
        )
        gw, observed = await start(
            start_gateway, config_yaml(up.url, route="limits: [slots]\n", top=LIMITED)
        )
        semaphore = gw.runtime.admission.semaphores["slots"]
        async with client.post(gw.url + CHAT, json=chat_body()) as holder:
            await holder.content.readuntil(b"a ")
            queued = asyncio.create_task(_chat(client, gw.url))  # needs 2 units, 1 is free
            await eventually(lambda: semaphore.waiting == 1, what="queued request")
            busy = await scrape(client, gw.admin_url)
            release.set()
            await holder.read()
        assert (await queued)[0] == 200
        await observed.wait(2)
        s = await scrape(client, gw.admin_url)
    assert busy("streamgate_concurrency_in_use") == {"limit=slots": 2.0}
    assert busy("streamgate_concurrency_capacity") == {"limit=slots": 3.0}
    assert busy("streamgate_concurrency_waiting") == {"limit=slots": 1.0}
    assert busy("streamgate_active_streams") == {R: 1.0}
    assert s("streamgate_concurrency_in_use") == {"limit=slots": 0.0}
    assert s("streamgate_concurrency_capacity") == {"limit=slots": 3.0}
    assert s("streamgate_concurrency_waiting") == {"limit=slots": 0.0}
    assert s("streamgate_requests_total") == {STREAM_200: 2.0}


async def test_a_client_that_leaves_while_queued_is_counted_without_an_upstream(
    start_gateway, upstream, client
):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]))
    gw, observed = await start(
        start_gateway, config_yaml(upstream.url, route="limits: [slots]\n", top=LIMITED)
    )
    semaphore = gw.runtime.admission.semaphores["slots"]
    async with client.post(gw.url + CHAT, json=chat_body()) as holder:
        await holder.content.readuntil(b"a ")
        queued = asyncio.create_task(_chat(client, gw.url))
        await eventually(lambda: semaphore.waiting == 1, what="queued request")
        queued.cancel()
        await observed.wait(1)
        s = await scrape(client, gw.admin_url)
    assert s("streamgate_requests_total") == {"route=r,status=499,stream=true,upstream=none": 1.0}
    assert s("streamgate_client_disconnects_total") == {R: 1.0}
    assert s("streamgate_concurrency_waiting") == {"limit=slots": 0.0}
    assert s("streamgate_concurrency_in_use") == {"limit=slots": 2.0}  # the holder's


async def test_a_rate_limited_request_is_a_429_counted_by_limit(start_gateway, upstream, client):
    upstream.script(OK_STREAM)
    gw, observed = await start(
        start_gateway, config_yaml(upstream.url, route="limits: [per-route]\n", top=LIMITED)
    )
    assert [(await _chat(client, gw.url))[0] for _ in range(2)] == [200, 429]
    await observed.wait(2)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_rate_limited_total") == {"limit=per-route": 1.0}
    assert s("streamgate_requests_total") == {
        STREAM_200: 1.0,
        "route=r,status=429,stream=true,upstream=none": 1.0,  # never reached an upstream
    }
    assert s("streamgate_upstream_attempts_total") == {"outcome=ok,upstream=up": 1.0}


async def _hold_and_queue(client, gw, release: asyncio.Event, linger: float):
    """One stream holds 2 of 3 units; a second (2 units) queues for `linger` s, then
    `release` lets the first finish. Returns the queued request's status."""
    semaphore = gw.runtime.admission.semaphores["slots"]
    async with client.post(gw.url + CHAT, json=chat_body()) as holder:
        await holder.content.readuntil(b"a ")
        queued = asyncio.create_task(_chat(client, gw.url))
        await eventually(lambda: semaphore.waiting == 1, what="queued request")
        await asyncio.sleep(linger)
        release.set()
        await holder.read()
    return (await queued)[0]


GAVE_UP_503 = "route=r,status=503,stream=true,upstream=none"


@pytest.mark.parametrize(
    "queue_timeout, status, requests",
    [
        pytest.param("5s", 200, {STREAM_200: 2.0}, id="admitted"),
        pytest.param("100ms", 503, {STREAM_200: 1.0, GAVE_UP_503: 1.0}, id="gave-up"),
    ],
)
async def test_time_waiting_for_units_is_observed_by_limit(
    start_gateway, upstream, client, queue_timeout, status, requests
):
    release = asyncio.Event()
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a "), WaitFor(release), done()]),
        OK_STREAM,
    )
    route = f"limits: [slots]\ntimeouts: {{queue: {queue_timeout}}}\n"
    gw, observed = await start(start_gateway, config_yaml(upstream.url, route=route, top=LIMITED))
    assert await _hold_and_queue(client, gw, release, linger=0.15) == status
    await observed.wait(2)
    s = await scrape(client, gw.admin_url)
    # Only a request that had to queue is observed (the holder was admitted at once).
    assert s("streamgate_queue_wait_seconds_count") == {"limit=slots": 1.0}
    assert s.value("streamgate_queue_wait_seconds_sum", "limit=slots") >= 0.1
    assert s("streamgate_requests_total") == requests
    assert s("streamgate_concurrency_in_use") == {"limit=slots": 0.0}
    assert s("streamgate_concurrency_waiting") == {"limit=slots": 0.0}


# ----------------------------------------------------------------- worker pools


async def test_worker_restarts_are_counted_by_pool(start_gateway, client):
    cfg = (
        "server: {listen: 127.0.0.1:0, shutdown_grace: 1s}\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "telemetry: {access_log: off}\n"
        "upstreams:\n"
        "  gpu-pool:\n"
        "    kind: worker_pool\n"
        '    command: ["/nonexistent/worker", "{port}"]\n'
        "    count: 1\n"
        "    restart: {backoff: 50ms, max_backoff: 100ms}\n"
        "    stop_grace: 1s\n"
        "routes:\n  - name: r\n    upstream: gpu-pool\n    match: {path_prefix: /}\n"
    )
    gw = await start_gateway(cfg)
    registry = gw.gateway.metrics.registry
    labels = {"upstream": "gpu-pool"}
    await eventually(
        lambda: (registry.get_sample_value("streamgate_worker_restarts_total", labels) or 0) >= 2,
        timeout=5,
        what="two restarts",
    )
    s = await scrape(client, gw.admin_url)
    ((series, restarts),) = s("streamgate_worker_restarts_total").items()
    assert series == "upstream=gpu-pool" and restarts >= 2  # a crash loop: it keeps trying
    ((endpoint, healthy),) = s("streamgate_endpoint_healthy").items()
    assert endpoint.startswith("endpoint=http://127.0.0.1:")
    assert endpoint.endswith(",upstream=gpu-pool")
    assert healthy == 0.0  # never ready: out of rotation


# ----------------------------------------------------------------- label values


async def test_no_label_value_comes_from_request_data(start_gateway, upstream, client):
    upstream.default = OK_STREAM
    cfg = config_yaml(upstream.url).replace(
        "match: {path_prefix: /}", "match: {path: /v1/chat/completions}"
    )
    gw, observed = await start(start_gateway, cfg)
    marker = "zqxj"
    headers = {
        "x-request-id": f"{marker}-request-id",
        "authorization": f"Bearer {marker}-secret",
        "x-tenant": f"{marker}-tenant",
        "user-agent": f"{marker}-agent",
    }
    body = chat_body(model=f"{marker}-model")
    body["user"] = f"{marker}-user"
    async with client.post(
        gw.url + CHAT + f"?{marker}=query", json=body, headers=headers
    ) as resp:
        assert resp.status == 200
        await resp.read()
    weird_path = f"/v1/{marker}-path/%7B%7D"
    async with client.post(gw.url + weird_path, json=body, headers=headers) as resp:
        assert resp.status == 404
    await observed.wait(2)
    s = await scrape(client, gw.admin_url)
    assert marker not in s.text
    assert s("streamgate_requests_total") == {
        STREAM_200: 1.0,
        "route=none,status=404,stream=true,upstream=none": 1.0,
    }
    config_names = {"r", "up", upstream.url, "none"}
    closed_sets = {"true", "false", "200", "404", "ok", "completed", "prompt", "completion"}
    assert s.label_values <= config_names | closed_sets, s.label_values - config_names


# ----------------------------------------------------------------- shutdown


async def test_streams_cut_by_shutdown_have_outcome_shutdown(start_gateway, upstream, client):
    upstream.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]))
    server = "shutdown_grace: 200ms, drain_delay: 200ms"
    gw, observed = await start(start_gateway, config_yaml(upstream.url, server=server))
    registry = gw.gateway.metrics.registry
    async with client.post(gw.url + CHAT, json=chat_body()) as resp:
        await resp.content.readuntil(b"a ")
        draining = asyncio.create_task(gw.gateway.drain_and_stop())
        await eventually(lambda: gw.gateway.draining, what="draining")
        assert (await _chat(client, gw.url))[0] == 503  # during drain_delay: refused
        rest = await resp.read()
    await asyncio.wait_for(draining, 5)
    await observed.wait(2)
    assert b"event: error" in rest and b"[DONE]" not in rest
    s = Scrape(generate_latest(registry).decode())  # the admin listener is gone by now
    assert s("streamgate_requests_total") == {
        STREAM_200: 1.0,
        # Refused before its body was read: neither its route nor that it streams is known.
        "route=none,status=503,stream=false,upstream=none": 1.0,
    }
    assert s("streamgate_stream_duration_seconds_count") == {"outcome=shutdown,route=r": 1.0}
    assert s("streamgate_stream_errors_total") == {"kind=shutdown,route=r": 1.0}
    assert s("streamgate_active_streams") == {R: 0.0}


# ----------------------------------------------------------------- config reloads


@pytest.fixture
async def file_gateway(tmp_path):
    """A gateway whose config is a real file, so /admin/reload can read it again."""
    started: list[Gateway] = []

    async def start_from(text: str):
        path = tmp_path / "gateway.yaml"
        path.write_text(text)
        gateway = Gateway(str(path), load_config(str(path)))
        url, admin_url = await gateway.start()
        started.append(gateway)
        return path, gateway, url, admin_url

    yield start_from
    for gateway in started:
        await gateway.stop()


async def _reload(client, admin_url: str) -> tuple[int, dict]:
    async with client.post(admin_url + "/admin/reload") as resp:
        return resp.status, await resp.json()


async def test_reloads_are_counted_by_result(file_gateway, upstream, client):
    path, gateway, _, admin_url = await file_gateway(config_yaml(upstream.url))
    assert await _reload(client, admin_url) == (200, {"result": "ok"})
    path.write_text(config_yaml(upstream.url) + "bogus_key: 1\n")
    status, answer = await _reload(client, admin_url)
    assert status == 400 and answer["result"] == "error"
    assert answer["errors"] and all(e.startswith(str(path) + ":") for e in answer["errors"])
    s = await scrape(client, admin_url)
    assert s("streamgate_config_reloads_total") == {"result=error": 1.0, "result=ok": 1.0}


async def test_counts_survive_a_reload(file_gateway, upstream, client):
    upstream.default = OK_STREAM
    path, gateway, url, admin_url = await file_gateway(config_yaml(upstream.url))
    old = gateway.runtime
    before = Observed(old)
    assert (await _chat(client, url))[0] == 200
    await before.wait(1)
    assert await _reload(client, admin_url) == (200, {"result": "ok"})
    assert gateway.runtime is not old
    after = Observed(gateway.runtime)
    assert (await _chat(client, url))[0] == 200
    await after.wait(1)
    assert (before.count, after.count) == (1, 1)  # one request on each runtime
    s = await scrape(client, admin_url)
    assert s("streamgate_requests_total") == {STREAM_200: 2.0}
    assert s("streamgate_config_reloads_total") == {"result=ok": 1.0}


async def test_a_request_waiting_for_its_first_chunk_survives_a_reload(
    file_gateway, upstream, client
):
    go = asyncio.Event()
    upstream.script(Respond(sse=True, chunks=[role_delta(), WaitFor(go), content("a "), done()]))
    cfg = config_yaml(upstream.url, route="timeouts: {connect: 100ms, first_chunk: 1s}\n")
    path, gateway, url, admin_url = await file_gateway(cfg)
    task = asyncio.create_task(_chat(client, url))
    await upstream.wait_for_requests(1)
    assert await _reload(client, admin_url) == (200, {"result": "ok"})
    await asyncio.sleep(0.05)  # let the old runtime's close run, if it is going to
    go.set()
    status, body = await asyncio.wait_for(task, 5)
    assert status == 200 and b"a " in body
