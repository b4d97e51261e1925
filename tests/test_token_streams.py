"""Token budgets and the streams they watch, through the real gateway:

- a stream a budget charges is settled to the upstream's usage even when its client did not
  ask for it: the gateway asks (`stream_options.include_usage`) and drops the usage-only event,
  so the client's bytes are what it would have got (checked with the real `openai` client);
- `max_tokens_per_stream` ends a stream that produces more, visibly, and settles what it made.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.config.loader import load_config_text
from gateway.engine.routing import RequestFacts
from gateway.errors import ConfigErrors
from gateway.explain import explain_lines
from tests.conftest import chat_body, config_yaml, http_upstream
from tests.support.scripted_upstream import (
    RecordedRequest,
    Respond,
    ScriptedUpstream,
    Stall,
    WaitFor,
    chat_chunk,
    content,
    done,
    finish,
    role_delta,
    sse_data,
    usage_chunk,
)
from tests.test_admission import CHAT, NO_RETRY
from tests.test_metrics import scrape
from tests.test_token_budgets import budget_yaml, prompt_estimate, settled_becomes

LOCAL = ("local", "")
WORDS = ["Once", " upon", " a", " time"]
USAGE = (11, 4)


def honours_include_usage(null_usage: bool):
    """An upstream handler that streams WORDS and, when asked, usage: at the end in an event
    of its own and, like OpenAI's API (`null_usage`), as `"usage":null` in every other chunk."""

    def answer(request: RecordedRequest) -> Respond:
        options = request.json().get("stream_options") or {}
        asked = options.get("include_usage") is True

        def event(chunk: dict) -> bytes:
            if asked and null_usage:
                chunk["usage"] = None
            return sse_data(chunk)

        chunks = [event(chat_chunk({"role": "assistant", "content": ""}))]
        chunks += [event(chat_chunk({"content": word})) for word in WORDS]
        chunks.append(event(chat_chunk({}, finish_reason="stop")))
        if asked:
            chunks.append(usage_chunk(*USAGE))
        return Respond(sse=True, chunks=[*chunks, done()])

    return answer


async def post_raw(client, url: str, body: dict | bytes, path: str = CHAT) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with client.post(url + path, data=data, headers=headers) as resp:
        return resp.status, await resp.read()


@pytest.mark.parametrize("null_usage", [False, True], ids=["usage-at-the-end", "openai-nulls"])
async def test_the_client_gets_the_same_chunks_whether_or_not_the_gateway_asked_for_usage(
    start_gateway, upstream, client, null_usage
):
    openai = pytest.importorskip("openai")
    top, name = budget_yaml(LOCAL, tokens=100_000)
    upstream.default = honours_include_usage(null_usage)
    plain = await start_gateway(config_yaml(upstream.url))
    budgeted = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))

    async def chunks(gw) -> list[dict]:
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x") as api:
            stream = await api.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hello"}], stream=True
            )
            return [chunk.model_dump() for chunk in [c async for c in stream]]

    seen = await chunks(budgeted)
    assert seen == await chunks(plain)
    assert "".join(c["choices"][0]["delta"]["content"] or "" for c in seen) == "".join(WORDS)
    assert all(c["choices"] and c.get("usage") is None for c in seen)
    # Byte for byte too, and the upstream was asked only through the budgeted route.
    assert await post_raw(client, budgeted.url, chat_body()) == await post_raw(
        client, plain.url, chat_body()
    )
    asked = [r.json().get("stream_options") for r in upstream.requests]
    assert asked == [{"include_usage": True}, None, {"include_usage": True}, None]
    await settled_becomes(client, budgeted, name, 2 * sum(USAGE))


async def test_a_client_that_asked_for_usage_gets_it_and_its_body_is_sent_as_is(
    start_gateway, upstream, client
):
    top, name = budget_yaml(LOCAL, tokens=100_000)
    upstream.default = honours_include_usage(null_usage=False)
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    body = json.dumps(chat_body(stream_options={"include_usage": True})).encode()
    status, received = await post_raw(client, gw.url, body)
    assert status == 200
    assert usage_chunk(*USAGE) in received and received.endswith(done())
    assert upstream.requests[0].body == body
    await settled_becomes(client, gw, name, sum(USAGE))


async def test_every_try_and_fallback_sends_the_same_rewritten_body(
    start_gateway, upstream, client
):
    top, name = budget_yaml(LOCAL, tokens=100_000)
    busy = Respond(status=503, json={"error": {"message": "busy"}})
    upstream.script(busy, busy)
    async with ScriptedUpstream() as other:
        other.default = honours_include_usage(null_usage=False)
        route = (
            f"limits: [{name}]\nfallbacks: [{{upstream: other, model: m2}}]\n"
            "retry: {attempts: 2, backoff: {base: 1ms, max: 1ms, jitter: false}}\n"
        )
        gw = await start_gateway(
            config_yaml(
                upstream.url, route=route, top=top, extra_upstreams=http_upstream("other", other.url)
            )
        )
        body = json.dumps(chat_body()).encode()
        status, received = await post_raw(client, gw.url, body)
        assert status == 200 and b'"usage"' not in received
        first, second = (r.body for r in upstream.requests)
        assert first == second == b'{"stream_options":{"include_usage":true},' + body[1:]
        (fallback,) = other.requests
        assert fallback.json() == {
            **chat_body(),
            "model": "m2",
            "stream_options": {"include_usage": True},
        }
    await settled_becomes(client, gw, name, sum(USAGE))


@pytest.mark.parametrize(
    "body, path",
    [
        pytest.param(json.dumps(chat_body(stream=False)).encode(), CHAT, id="not-a-stream"),
        pytest.param(b"stream: true, but not JSON", CHAT, id="not-json"),
        pytest.param(json.dumps(chat_body()).encode(), "/v1/responses", id="other-endpoint"),
        pytest.param(
            json.dumps(chat_body(stream_options="odd")).encode(), CHAT, id="odd-stream-options"
        ),
    ],
)
async def test_a_request_that_cannot_ask_for_usage_is_sent_as_is(
    start_gateway, upstream, client, body, path
):
    top, name = budget_yaml(LOCAL, tokens=100_000)
    upstream.default = Respond(json={"choices": []})
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    headers = {"Content-Type": "text/plain"}
    async with client.post(gw.url + path, data=body, headers=headers) as resp:
        assert resp.status == 200
    assert upstream.requests[0].body == body


async def test_a_route_without_a_token_budget_sends_the_body_as_is(
    start_gateway, upstream, client
):
    upstream.default = honours_include_usage(null_usage=False)
    gw = await start_gateway(config_yaml(upstream.url))
    body = json.dumps(chat_body()).encode()
    assert (await post_raw(client, gw.url, body))[0] == 200
    assert upstream.requests[0].body == body


async def test_a_stream_without_content_is_relayed_without_the_usage_event_it_was_asked_for(
    start_gateway, upstream, client
):
    """A 200 that ends before any content is relayed whole, as held back: the usage-only event
    the gateway asked for is not part of it either."""
    top, name = budget_yaml(LOCAL, tokens=100_000)
    without_usage = [role_delta(), finish(), done()]
    upstream.default = Respond(sse=True, chunks=[*without_usage[:2], usage_chunk(9, 0), done()])
    route = f"limits: [{name}]\n" + NO_RETRY
    gw = await start_gateway(config_yaml(upstream.url, route=route, top=top))
    assert await post_raw(client, gw.url, chat_body()) == (200, b"".join(without_usage))
    await settled_becomes(client, gw, name, 9)


# ----------------------------------------------------------------- max_tokens_per_stream


def events_of(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


class Endings:
    """How the gateway says each request ended (what its access log line and metrics get)."""

    def __init__(self, runtime) -> None:
        self.seen: list[tuple[str, str | None, int]] = []
        self.changed = asyncio.Event()
        observe = runtime.observe

        def recording(ctx) -> None:
            observe(ctx)
            self.seen.append((ctx.outcome, ctx.error_kind, ctx.chunks))
            self.changed.set()

        runtime.observe = recording

    async def first(self) -> tuple[str, str | None, int]:
        async with asyncio.timeout(5):
            while not self.seen:
                self.changed.clear()
                await self.changed.wait()
        return self.seen[0]


async def capped_gateway(start_gateway, upstream, cap: int):
    top, name = budget_yaml(LOCAL, tokens=100_000, extra=f", max_tokens_per_stream: {cap}")
    gw = await start_gateway(config_yaml(upstream.url, route=f"limits: [{name}]\n", top=top))
    return gw, name, Endings(gw.runtime)


async def test_a_stream_past_its_token_cap_ends_with_an_error_event_and_is_settled(
    start_gateway, upstream, client
):
    go = asyncio.Event()
    words = [content(f"w{i} ") for i in range(8)]
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), words[0], WaitFor(go), *words[1:], Stall()])
    )
    gw, name, endings = await capped_gateway(start_gateway, upstream, cap=3)
    async with client.post(gw.url + CHAT, json=chat_body(max_tokens=100)) as resp:
        assert resp.status == 200
        body = await resp.content.readuntil(b"w0 ")  # committed: two events, under the cap
        go.set()
        body += await resp.read()
    *relayed, last = events_of(body)
    assert last.startswith(b"event: error\n")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["type"] == "token_cap_exceeded"
    assert done() not in body
    assert len(relayed) in (2, 3)  # role + w0, and w1 only if it came in a read of its own
    await upstream.wait_connections_closed()
    outcome, error, chunks = await endings.first()
    assert (outcome, error) == ("token_cap_exceeded", "token_cap_exceeded")
    assert chunks == len(relayed)
    # Settled to what was relayed (no usage came): the prompt estimate and one per event.
    await settled_becomes(client, gw, name, prompt_estimate(100) + chunks)
    s = await scrape(client, gw.admin_url)
    assert s("streamgate_stream_errors_total") == {"kind=token_cap_exceeded,route=r": 1.0}
    assert s("streamgate_stream_duration_seconds_count") == {
        "outcome=token_cap_exceeded,route=r": 1.0
    }


@pytest.mark.parametrize("client_asked", [False, True], ids=["usage-asked-by-gateway", "by-client"])
async def test_usage_past_the_cap_ends_the_stream_instead_of_its_done(
    start_gateway, upstream, client, client_asked
):
    go = asyncio.Event()
    upstream.script(
        Respond(
            sse=True,
            chunks=[role_delta(), content("a"), WaitFor(go), usage_chunk(5, 50), done()],
        )
    )
    gw, name, endings = await capped_gateway(start_gateway, upstream, cap=10)
    extra = {"stream_options": {"include_usage": True}} if client_asked else {}
    async with client.post(gw.url + CHAT, json=chat_body(**extra)) as resp:
        body = await resp.content.readuntil(b'"a"')
        go.set()
        body += await resp.read()
    assert events_of(body)[:2] == events_of(role_delta() + content("a"))
    assert b"event: error" in body and done() not in body and b'"usage"' not in body
    assert (await endings.first())[:2] == ("token_cap_exceeded", "token_cap_exceeded")
    await settled_becomes(client, gw, name, 55)  # the upstream's own count


async def test_a_stream_within_its_cap_completes(start_gateway, upstream, client):
    upstream.script(
        Respond(sse=True, chunks=[role_delta(), content("a"), usage_chunk(5, 3), done()])
    )
    gw, name, endings = await capped_gateway(start_gateway, upstream, cap=4)
    status, body = await post_raw(client, gw.url, chat_body())
    assert status == 200 and body.endswith(done()) and b"event: error" not in body
    assert (await endings.first())[:2] == ("completed", None)


def test_a_cap_below_one_is_rejected_where_it_is_written():
    text = (
        'upstreams: {a: {endpoints: [{url: "http://h"}]}}\n'
        "limits: {tokens: {t: {tokens: 9, max_tokens_per_stream: 0}}}\n"
        "routes: [{name: r, upstream: a, limits: [t]}]\n"
    )
    with pytest.raises(ConfigErrors) as raised:
        load_config_text(text, "gw.yaml", env={})
    (error,) = raised.value.errors
    assert str(error).startswith("gw.yaml:2:")
    assert "limits.tokens.t.max_tokens_per_stream: must be at least 1, got 0" in str(error)


def test_explain_shows_the_cap_and_the_usage_the_gateway_asks_for():
    top = "limits:\n  tokens:\n    tpm: {tokens: 5000, max_tokens_per_stream: 700}\n"
    config = load_config_text(
        config_yaml("http://127.0.0.1:1", route="limits: [tpm]\n", top=top), "t.yaml", env={}
    )
    facts = RequestFacts("POST", CHAT, {}, "m")
    lines = "\n".join(explain_lines(config, facts, stream=True, body=json.dumps(chat_body())))
    assert "a stream is ended past 700 completion tokens (max_tokens_per_stream)" in lines
    assert "the gateway asks the upstream for usage (stream_options.include_usage)" in lines
    asked = json.dumps(chat_body(stream_options={"include_usage": True}))
    lines = "\n".join(explain_lines(config, facts, stream=True, body=asked))
    assert "asks the upstream for usage" not in lines
