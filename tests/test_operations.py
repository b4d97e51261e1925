"""Operations: reload (SIGHUP, POST /admin/reload, a change on disk) under live streams, and
graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config.loader import load_config
from tests.conftest import GatewayProcess, chat_body
from tests.support.scripted_upstream import (
    Respond,
    ScriptedUpstream,
    WaitFor,
    content,
    done,
    role_delta,
)


def write_config(path: Path, upstream_url: str, route_prefix: str = "/", extra: str = "") -> None:
    path.write_text(
        "server: {listen: 127.0.0.1:0, shutdown_grace: 5s}\nadmin: {listen: 127.0.0.1:0}\n"
        "telemetry: {access_log: off}\n"
        f'upstreams:\n  up: {{kind: http, endpoints: [{{url: "{upstream_url}"}}]}}\n'
        f"routes:\n  - {{name: r, upstream: up, match: {{path_prefix: {route_prefix}}}}}\n" + extra
    )


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url, json=chat_body(stream=False)) as resp:
        await resp.read()
        return resp.status


@pytest.fixture
async def in_process(tmp_path):
    """An in-process gateway on a real config file (so reloads read the disk)."""
    started: list[Gateway] = []

    async def start(path: Path) -> tuple[Gateway, str, str]:
        gateway = Gateway(str(path), load_config(str(path)))
        gateway.watch_interval = 0.05
        url, admin = await gateway.start()
        started.append(gateway)
        return gateway, url, admin

    yield start
    for gateway in started:
        await gateway.stop()


def _paused_stream(release: asyncio.Event) -> Respond:
    """An SSE stream that stops after its first token until `release` is set."""
    return Respond(
        sse=True, chunks=[role_delta(), content("a "), WaitFor(release), content("b "), done()]
    )


async def _stream_in_flight(session, url):
    """Start a streaming request through the gateway; return its reader task."""

    async def run() -> bytes:
        async with session.post(url + "/a/chat", json=chat_body()) as resp:
            assert resp.status == 200
            return await resp.read()

    return asyncio.create_task(run())


@pytest.mark.parametrize("trigger", ["admin", "file", "atomic-rename"])
async def test_reload_switches_routes_without_dropping_a_stream(in_process, tmp_path, trigger):
    async with ScriptedUpstream() as up, aiohttp.ClientSession() as session:
        release = asyncio.Event()
        up.script(_paused_stream(release))
        up.default = Respond(json={})
        path = tmp_path / "gw.yaml"
        write_config(path, up.url, route_prefix="/a/")
        gateway, url, admin = await in_process(path)
        stream = await _stream_in_flight(session, url)
        await up.wait_for_requests(1)
        assert await _status(session, url + "/b/x") == 404

        if trigger == "admin":
            write_config(path, up.url, route_prefix="/b/")
            async with session.post(admin + "/admin/reload") as resp:
                assert (resp.status, await resp.json()) == (200, {"result": "ok"})
        else:
            new = tmp_path / "gw.yaml.new"
            write_config(new, up.url, route_prefix="/b/")
            if trigger == "atomic-rename":
                os.replace(new, path)  # what a ConfigMap update does to the file it points at
            else:
                path.write_text(new.read_text())
            async with asyncio.timeout(5):
                while gateway.runtime.config.routes[0].match.path_prefix != "/b/":
                    await asyncio.sleep(0.02)

        assert await _status(session, url + "/b/x") == 200
        assert await _status(session, url + "/a/x") == 404
        release.set()
        body = await asyncio.wait_for(stream, 5)
        assert body.endswith(done()) and b"b " in body  # the old stream finished, untouched


async def test_an_invalid_reload_is_rejected_whole_and_the_old_routes_keep_serving(
    in_process, tmp_path
):
    async with ScriptedUpstream() as up, aiohttp.ClientSession() as session:
        up.default = Respond(json={})
        path = tmp_path / "gw.yaml"
        write_config(path, up.url, route_prefix="/a/")
        gateway, url, admin = await in_process(path)
        path.write_text(path.read_text().replace("upstream: up,", "upstream: nope,"))
        async with session.post(admin + "/admin/reload") as resp:
            body = await resp.json()
        assert resp.status == 400
        assert body["result"] == "error"
        assert body["errors"] == [f"{path}:7:25: routes[0].upstream: unknown upstream 'nope'"]
        assert await _status(session, url + "/a/x") == 200
        async with session.get(admin + "/metrics") as resp:
            metrics = await resp.text()
        assert 'streamgate_config_reloads_total{result="error"} 1.0' in metrics


async def test_sighup_reloads(tmp_path):
    async with ScriptedUpstream() as up, aiohttp.ClientSession() as session:
        up.default = Respond(json={})
        path = tmp_path / "gw.yaml"
        write_config(path, up.url, route_prefix="/a/")
        async with GatewayProcess(path) as gw:
            assert await _status(session, gw.url + "/b/x") == 404
            write_config(path, up.url, route_prefix="/b/")
            gw.proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(5):
                while await _status(session, gw.url + "/b/x") != 200:
                    await asyncio.sleep(0.05)
            assert await _status(session, gw.url + "/a/x") == 404


async def test_drain_lets_a_stream_finish_refuses_new_requests_and_exits_zero(tmp_path):
    async with ScriptedUpstream() as up, aiohttp.ClientSession() as session:
        release = asyncio.Event()
        up.script(_paused_stream(release))
        path = tmp_path / "gw.yaml"
        write_config(path, up.url)
        path.write_text(
            path.read_text().replace(
                "shutdown_grace: 5s", "shutdown_grace: 10s, drain_delay: 300ms"
            )
        )
        gw = GatewayProcess(path)
        await gw.start()
        try:
            stream = await _stream_in_flight(session, gw.url)
            await up.wait_for_requests(1)
            gw.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):  # readiness fails at once
                while True:
                    async with session.get(gw.admin_url + "/readyz") as resp:
                        if resp.status == 503:
                            assert "draining" in (await resp.json())["reasons"]
                            break
            async with session.post(gw.url + "/x", json=chat_body(stream=False)) as resp:
                assert resp.status == 503  # still listening (drain_delay) but refusing
                assert (await resp.json())["error"]["type"] == "shutting_down"
            release.set()
            body = await asyncio.wait_for(stream, 5)
            assert body.endswith(done())
            assert await asyncio.wait_for(gw.proc.wait(), 10) == 0
        finally:
            await gw.stop()


async def test_drain_past_the_grace_period_ends_streams_with_an_error_event(tmp_path):
    async with ScriptedUpstream() as up, aiohttp.ClientSession() as session:
        never = asyncio.Event()
        up.script(Respond(sse=True, chunks=[role_delta(), content("a "), WaitFor(never)]))
        path = tmp_path / "gw.yaml"
        write_config(path, up.url)
        path.write_text(path.read_text().replace("shutdown_grace: 5s", "shutdown_grace: 300ms"))
        gw = GatewayProcess(path)
        await gw.start()
        try:
            stream = await _stream_in_flight(session, gw.url)
            await up.wait_for_requests(1)
            gw.proc.send_signal(signal.SIGTERM)
            body = await asyncio.wait_for(stream, 5)
            last_event = body.rstrip(b"\n").split(b"\n\n")[-1]
            assert last_event.startswith(b"event: error")
            assert json.loads(last_event.split(b"data: ", 1)[1])["error"]["type"] == "shutting_down"
            assert b"[DONE]" not in body
            assert await asyncio.wait_for(gw.proc.wait(), 10) == 0
        finally:
            await gw.stop()


async def test_a_reload_that_moves_the_listener_says_it_needs_a_restart(
    in_process, tmp_path, caplog
):
    async with ScriptedUpstream() as up, aiohttp.ClientSession() as session:
        up.default = Respond(json={})
        path = tmp_path / "gw.yaml"
        write_config(path, up.url)
        gateway, url, admin = await in_process(path)
        path.write_text(
            path.read_text().replace(
                "listen: 127.0.0.1:0, shutdown_grace", "listen: 127.0.0.1:1, shutdown_grace"
            )
        )
        async with session.post(admin + "/admin/reload") as resp:
            assert resp.status == 200
        assert "server.listen changed: it takes effect on restart" in caplog.text
        assert await _status(session, url + "/x") == 200  # still serving where it was
