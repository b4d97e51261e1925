"""Baseten Truss Chains typed streams through the gateway, with the real `truss` package:
`truss_chains.streaming`'s writer makes every byte the upstream sends, and its reader is the
client. A cut stream must reach the reader as broken, never as a clean end."""

from __future__ import annotations

import asyncio

import aiohttp
import pydantic
import pytest
from aiohttp import web
from truss_chains import streaming

from gateway.engine import truss
from tests.conftest import config_yaml, http_upstream
from tests.support.scripted_upstream import Raw, Reset, Respond, ScriptedUpstream, Stall


class Header(pydantic.BaseModel):
    model: str


class Item(pydantic.BaseModel):
    token: str


class Footer(pydantic.BaseModel):
    tokens: int


TYPES = streaming.stream_types(Item, header_type=Header, footer_type=Footer)
TOKENS = ["a", "b", "c", "d", "e"]
OCTETS = {"Content-Type": "application/octet-stream"}


def frames(tokens=TOKENS, header=True, footer=True) -> list[bytes]:
    """The bytes the real writer produces, one entry per frame."""
    writer = streaming.stream_writer(TYPES)
    out = [bytes(writer.yield_header(Header(model="m")))] if header else []
    out += [bytes(writer.yield_item(Item(token=t))) for t in tokens]
    if footer:
        out.append(bytes(writer.yield_footer(Footer(tokens=len(tokens)))))
    return out


async def read_all(response: aiohttp.ClientResponse) -> tuple[Header, list[Item], Footer]:
    reader = streaming.stream_reader(TYPES, response.content.iter_any())
    header = await reader.read_header()
    items = [item async for item in reader.read_items()]
    return header, items, await reader.read_footer()


@pytest.fixture
async def truss_upstream():
    """An aiohttp server whose handler streams with the real writer, a frame at a time."""

    async def generate(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=OCTETS)
        await response.prepare(request)
        for frame in frames():
            await response.write(frame)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/generate", generate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


async def test_typed_stream_relays_to_the_real_reader(start_gateway, truss_upstream, client):
    gw = await start_gateway(config_yaml(truss_upstream, route="framing: truss\n"))
    async with client.post(gw.url + "/generate", json={"stream": True}) as resp:
        assert resp.status == 200
        header, items, footer = await read_all(resp)
    assert header == Header(model="m")
    assert [i.token for i in items] == TOKENS
    assert footer == Footer(tokens=5)


async def test_frames_are_counted_as_chunks(start_gateway, upstream, client):
    upstream.script(Respond(headers=OCTETS, chunks=[b"".join(frames())]))
    gw = await start_gateway(config_yaml(upstream.url, route="framing: truss\n"))
    async with client.post(gw.url + "/generate", json={}) as resp:
        await resp.read()
    (sample,) = [
        s
        for m in gw.gateway.metrics.chunks_per_stream.collect()
        for s in m.samples
        if s.name.endswith("_sum")
    ]
    assert sample.value == len(TOKENS) + 2  # header, items and footer, all in one read


async def test_stream_cut_mid_answer_reaches_the_reader_as_broken(start_gateway, upstream, client):
    sent = frames()
    upstream.script(Respond(headers=OCTETS, chunks=[*sent[:3], Reset()]))
    gw = await start_gateway(config_yaml(upstream.url, route="framing: truss\n"))
    async with client.post(gw.url + "/generate", json={}) as resp:
        assert resp.status == 200
        with pytest.raises((aiohttp.ClientPayloadError, asyncio.IncompleteReadError)):
            await read_all(resp)


@pytest.mark.parametrize(
    "route, ends_cleanly",
    [
        pytest.param("framing: truss\n", True, id="footer-optional"),
        pytest.param("framing: {kind: truss, require_footer: true}\n", False, id="footer-required"),
    ],
)
async def test_a_missing_footer_is_a_truncation_where_the_route_requires_one(
    start_gateway, upstream, client, route, ends_cleanly
):
    upstream.script(Respond(headers=OCTETS, chunks=frames(footer=False)))
    gw = await start_gateway(config_yaml(upstream.url, route=route))
    async with client.post(gw.url + "/generate", json={}) as resp:
        if ends_cleanly:
            assert await resp.read() == b"".join(frames(footer=False))
        else:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_a_body_that_ends_inside_a_frame_is_cut_not_ended(start_gateway, upstream, client):
    sent = frames()
    half = sent[3][: len(sent[3]) // 2]
    upstream.script(Respond(headers=OCTETS, chunks=[*sent[:3], half]))  # then a clean 0-chunk
    gw = await start_gateway(config_yaml(upstream.url, route="framing: truss\n"))
    async with client.post(gw.url + "/generate", json={}) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_header_then_silence_fails_over_before_commit(start_gateway, upstream, client):
    """The header is held back like a role-only delta: the first ITEM commits, so a backend
    that sends its header and stalls is failed over and the client never sees its header."""
    upstream.script(Respond(headers=OCTETS, chunks=[frames()[0], Stall()]))
    async with ScriptedUpstream() as fallback:
        fallback.script(Respond(headers=OCTETS, chunks=frames()))
        route = (
            "framing: truss\nfallbacks: [spare]\n"
            "timeouts: {first_chunk: 300ms}\nretry: {attempts: 1}\n"
        )
        yaml = config_yaml(
            upstream.url, route=route, extra_upstreams=http_upstream("spare", fallback.url)
        )
        gw = await start_gateway(yaml)
        async with client.post(gw.url + "/generate", json={}) as resp:
            assert resp.status == 200
            header, items, footer = await read_all(resp)
        assert [i.token for i in items] == TOKENS and footer.tokens == 5
        await upstream.wait_connections_closed()  # the stalled try was closed, not pooled


@pytest.mark.parametrize(
    "data, end, count, items, footer",
    [
        pytest.param(b"", 0, 0, 0, False, id="empty"),
        pytest.param(truss.frame(3, b"x")[:4], 0, 0, 0, False, id="partial-tag"),
        pytest.param(truss.frame(3, b"xyz")[:7], 0, 0, 0, False, id="partial-payload"),
        pytest.param(truss.frame(2, b"h") + truss.frame(3, b""), 11, 2, 1, False, id="empty-item"),
        pytest.param(
            truss.frame(3, b"a") + truss.frame(4, b"f") + b"\x03",
            12,
            2,
            1,
            True,
            id="footer-then-partial",
        ),
    ],
)
def test_scan_finds_whole_frames_only(data, end, count, items, footer):
    seen = truss.Seen()
    assert truss.scan(data, seen) == (end, count)
    assert (seen.items, seen.footer) == (items, footer)


def test_scan_agrees_with_the_real_writer():
    data = b"".join(frames())
    seen = truss.Seen()
    assert truss.scan(data + Raw(b"\x03\x00").data, seen) == (len(data), len(TOKENS) + 2)
    assert seen.items == len(TOKENS) and seen.footer
