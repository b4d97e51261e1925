"""The relay, as a client and an upstream see it: bodies byte for byte, chunks as they arrive,
headers both ways, request bodies bounded, errors as JSON."""

from __future__ import annotations

import asyncio

import pytest
from yarl import URL

from tests.conftest import chat_body, config_yaml
from tests.support.scripted_upstream import (
    Respond,
    WaitFor,
    content,
    role_delta,
    sse_tokens,
)


async def _post(client, url, body, **kw):
    return await client.post(url + "/v1/chat/completions", json=body, **kw)


@pytest.mark.parametrize(
    "respond, stream, content_type",
    [
        pytest.param(
            lambda: Respond(sse=True, chunks=sse_tokens(["a ", "b ", "c "])),
            True,
            "text/event-stream",
            id="sse",
        ),
        pytest.param(
            lambda: Respond(
                headers={"Content-Type": "application/x-ndjson"},
                chunks=[b'{"t":"a"}\n', b'{"t":"b"}\n', b'{"t":"c"}\n'],
            ),
            True,
            "application/x-ndjson",
            id="ndjson",
        ),
        pytest.param(
            lambda: Respond(
                headers={"Content-Type": "text/plain"}, chunks=[b"hel", b"lo ", b"world"]
            ),
            False,
            "text/plain",
            id="chunked-plain",
        ),
        pytest.param(
            lambda: Respond(json={"id": "x", "choices": [{"message": {"content": "hi"}}]}),
            False,
            "application/json",
            id="unary-json",
        ),
        pytest.param(
            lambda: Respond(
                headers={"Content-Type": "application/octet-stream"},
                chunks=[bytes(range(256)) * 4, b"\x00\xff" * 100],
                content_length=True,
            ),
            False,
            "application/octet-stream",
            id="content-length-binary",
        ),
    ],
)
async def test_body_is_relayed_byte_for_byte(
    start_gateway, upstream, client, respond, stream, content_type
):
    expected = respond()
    sent = b"".join(c for c in expected.chunks if isinstance(c, bytes))
    upstream.script(expected)
    gw = await start_gateway(config_yaml(upstream.url))
    async with await _post(client, gw.url, chat_body(stream=stream)) as resp:
        assert resp.status == 200
        assert await resp.read() == sent
    assert resp.headers["Content-Type"] == content_type


async def test_first_chunk_reaches_client_while_upstream_is_still_sending(
    start_gateway, upstream, client
):
    go_on = asyncio.Event()
    upstream.script(
        Respond(
            sse=True, chunks=[role_delta(), content("first "), WaitFor(go_on), content("second ")]
        )
    )
    gw = await start_gateway(config_yaml(upstream.url))
    async with await _post(client, gw.url, chat_body()) as resp:
        assert resp.status == 200
        seen = b""
        async with asyncio.timeout(5):
            while b"first" not in seen:
                seen += await resp.content.readany()
        assert b"second" not in seen  # the upstream has not sent it yet
        go_on.set()
        rest = await resp.read()
    assert b"second" in rest


async def test_sse_response_carries_no_cache_headers(start_gateway, upstream, client):
    upstream.script(Respond(sse=True, chunks=sse_tokens(["a "])))
    gw = await start_gateway(config_yaml(upstream.url))
    async with await _post(client, gw.url, chat_body()) as resp:
        await resp.read()
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"


async def test_hop_by_hop_headers_are_dropped_both_ways(start_gateway, upstream, client):
    upstream.script(
        Respond(
            headers={
                "Content-Type": "application/json",
                "Connection": "keep-alive, X-Upstream-Hop",
                "X-Upstream-Hop": "secret",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "X-Kept": "yes",
            },
            body=b"{}",
        )
    )
    gw = await start_gateway(config_yaml(upstream.url))
    headers = {
        "Connection": "keep-alive, X-Client-Hop",
        "X-Client-Hop": "secret",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "X-Custom": "kept",
    }
    async with await _post(client, gw.url, chat_body(stream=False), headers=headers) as resp:
        await resp.read()
    (seen,) = await upstream.wait_for_requests(1)
    for name in ("X-Client-Hop", "Keep-Alive", "Proxy-Authorization", "TE"):
        assert name not in seen.headers, name
    assert seen.headers["X-Custom"] == "kept"
    for name in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate"):
        assert name not in resp.headers, name
    assert resp.headers["X-Kept"] == "yes"


@pytest.mark.parametrize("given", [None, "client-id-123"], ids=["created", "kept"])
async def test_request_id_is_kept_or_created_and_sent_both_ways(
    start_gateway, upstream, client, given
):
    upstream.script(Respond(json={}))
    gw = await start_gateway(config_yaml(upstream.url))
    headers = {"x-request-id": given} if given else {}
    async with await _post(client, gw.url, chat_body(stream=False), headers=headers) as resp:
        await resp.read()
    (seen,) = await upstream.wait_for_requests(1)
    returned = resp.headers["x-request-id"]
    assert seen.headers["x-request-id"] == returned
    if given:
        assert returned == given
    else:
        assert len(returned) >= 16


async def test_configured_upstream_headers_replace_the_clients(start_gateway, upstream, client):
    upstream.script(Respond(json={}))
    cfg = config_yaml(upstream.url, upstream='headers: {Authorization: "Bearer upstream-key"}\n')
    gw = await start_gateway(cfg)
    headers = {
        "Authorization": "Bearer client-key",
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
    }
    async with await _post(client, gw.url, chat_body(stream=False), headers=headers) as resp:
        await resp.read()
    (seen,) = await upstream.wait_for_requests(1)
    assert seen.headers.getall("Authorization") == ["Bearer upstream-key"]
    assert seen.headers["traceparent"] == headers["traceparent"]


async def test_method_path_query_and_body_reach_the_upstream_unchanged(
    start_gateway, upstream, client
):
    upstream.script(Respond(json={}))
    gw = await start_gateway(config_yaml(upstream.url))
    body = b'{"model": "m",  "odd spacing": [1, 2]}'
    url = gw.url + "/v1/x%20y/completions?a=1&b=%2F"
    headers = {"Content-Type": "application/json"}
    async with client.put(URL(url, encoded=True), data=body, headers=headers) as resp:
        await resp.read()
    (seen,) = await upstream.wait_for_requests(1)
    assert (seen.method, seen.path, seen.body) == ("PUT", "/v1/x%20y/completions?a=1&b=%2F", body)


async def test_request_body_over_the_limit_is_413_and_never_sent(start_gateway, upstream, client):
    gw = await start_gateway(config_yaml(upstream.url, server="max_request_body: 1KiB"))
    async with client.post(gw.url + "/v1/chat/completions", data=b"x" * 2048) as resp:
        body = await resp.json()
    assert resp.status == 413
    assert body["error"]["type"] == "request_too_large"
    assert body["error"]["request_id"] == resp.headers["x-request-id"]
    assert upstream.requests == []


async def test_chunked_request_body_over_the_limit_is_413(start_gateway, upstream, client):
    gw = await start_gateway(config_yaml(upstream.url, server="max_request_body: 1KiB"))

    async def body():
        for _ in range(4):
            yield b"y" * 512

    async with client.post(gw.url + "/v1/chat/completions", data=body()) as resp:
        await resp.read()
    assert resp.status == 413
    assert upstream.requests == []


async def test_no_matching_route_is_404_with_json_error(start_gateway, upstream, client):
    cfg = config_yaml(upstream.url).replace(
        "match: {path_prefix: /}", "match: {path: /v1/chat/completions}"
    )
    gw = await start_gateway(cfg)
    async with client.get(gw.url + "/elsewhere") as resp:
        body = await resp.json()
    assert resp.status == 404
    assert body == {
        "error": {
            "type": "no_route",
            "message": "no route matches GET /elsewhere",
            "request_id": resp.headers["x-request-id"],
        }
    }


async def test_malformed_json_request_is_400(start_gateway, upstream, client):
    gw = await start_gateway(config_yaml(upstream.url))
    headers = {"Content-Type": "application/json"}
    async with client.post(
        gw.url + "/v1/chat/completions", data=b'{"model": ', headers=headers
    ) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["type"] == "bad_request"
    assert "not valid JSON" in body["error"]["message"]
    assert upstream.requests == []


async def test_openai_client_streams_a_chat_completion_through_the_gateway(start_gateway):
    openai = pytest.importorskip("openai")
    from tests.support.procs import FakeLLM

    async with FakeLLM("--tokens", "5") as llm:
        gw = await start_gateway(config_yaml(llm.url))
        direct = openai.AsyncOpenAI(base_url=llm.url + "/v1", api_key="x")
        proxied = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="x")
        messages = [{"role": "user", "content": "tell me something"}]

        async def collect(c) -> tuple[str, list[str | None]]:
            stream = await c.chat.completions.create(
                model="llama-x", messages=messages, stream=True
            )
            parts, finishes = [], []
            async for chunk in stream:
                parts.append(chunk.choices[0].delta.content or "")
                finishes.append(chunk.choices[0].finish_reason)
            return "".join(parts), finishes

        assert await collect(proxied) == await collect(direct)
        unary = await proxied.chat.completions.create(model="llama-x", messages=messages)
        assert unary.model == "llama-x" and unary.choices[0].message.content
        await direct.close()
        await proxied.close()


async def test_error_body_is_json_with_type_message_and_request_id(start_gateway, client):
    # Nothing listens on port 9 of loopback: a connection failure, reported as 502.
    cfg = config_yaml("http://127.0.0.1:9", route="retry: {attempts: 1}\n")
    gw = await start_gateway(cfg)
    async with await _post(client, gw.url, chat_body()) as resp:
        body = await resp.json()
    assert resp.status == 502
    assert set(body["error"]) == {"type", "message", "request_id"}
    assert body["error"]["type"] == "upstream_unavailable"


async def test_two_endpoints_share_traffic_round_robin(start_gateway, client):
    from tests.support.scripted_upstream import ScriptedUpstream

    async with ScriptedUpstream() as a, ScriptedUpstream() as b:
        a.default = b.default = Respond(json={})
        gw = await start_gateway(config_yaml([a.url, b.url], upstream="balance: round_robin\n"))
        for _ in range(6):
            async with await _post(client, gw.url, chat_body(stream=False)) as resp:
                assert resp.status == 200
                await resp.read()
        assert (len(a.requests), len(b.requests)) == (3, 3)
