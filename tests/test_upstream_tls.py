"""https:// upstreams: reached over TLS with the certificate verified (plain http:// endpoints
go through the lean client; https:// ones through aiohttp's, whose default trust store
honours SSL_CERT_FILE, read when it is imported, so the gateway runs as a process here)."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import trustme
from aiohttp import web

from tests.conftest import GatewayProcess, chat_body
from tests.support.scripted_upstream import content, done, role_delta


@asynccontextmanager
async def _tls_upstream(ca: trustme.CA) -> AsyncIterator[str]:
    """An SSE chat upstream on https://127.0.0.1 with a certificate `ca` issued."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in (role_delta(), content("over tls"), done()):
            await response.write(event)
        await response.write_eof()
        return response

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "server: {listen: 127.0.0.1:0}\nadmin: {listen: 127.0.0.1:0}\n"
        f'upstreams:\n  up: {{kind: http, endpoints: [{{url: "{url}"}}]}}\n'
        "routes:\n  - {name: r, upstream: up, match: {path_prefix: /}, retry: {attempts: 1}}\n"
    )
    return path


async def _chat(gw: GatewayProcess) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp,
    ):
        return resp.status, await resp.read()


async def test_an_https_upstream_streams_over_verified_tls(tmp_path):
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with _tls_upstream(ca) as url:
        env = {"SSL_CERT_FILE": str(ca_file)}
        async with GatewayProcess(_config(tmp_path, url), env=env) as gw:
            status, body = await _chat(gw)
    assert status == 200
    assert b"over tls" in body and body.endswith(b"data: [DONE]\n\n")


async def test_an_https_upstream_with_an_untrusted_certificate_is_a_502(tmp_path):
    async with (
        _tls_upstream(trustme.CA()) as url,
        GatewayProcess(_config(tmp_path, url)) as gw,
    ):
        status, body = await _chat(gw)
    assert status == 502
    assert json.loads(body)["error"]["type"] == "upstream_unavailable"
