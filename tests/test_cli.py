"""The command line as an operator uses it: serve, validate, explain; run as real processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import aiohttp

from tests.conftest import GatewayProcess, chat_body
from tests.support.procs import REPO_ROOT
from tests.support.scripted_upstream import Respond, ScriptedUpstream, Stall, content, role_delta


def streamgate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=30,
    )


def test_validate_accepts_the_demo_config():
    result = streamgate("validate", "config/gateway.yaml")
    assert (result.returncode, result.stdout) == (0, "config/gateway.yaml: ok\n")


def test_validate_prints_every_error_with_file_line_column_and_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent("""\
        upstreams:
          local-gpu:
            kind: http
            endpoints: [{url: "http://127.0.0.1:8001"}]
        routes:
          - name: chat
            upstream: local-gpus
            timeouts: {first_chunk: 30 sec}
    """)
    )
    result = streamgate("validate", str(path))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert f"{path}:8:29: routes[0].timeouts.first_chunk: invalid duration '30 sec'" in lines[0]
    assert len(lines) == 1  # type errors first; references are checked once the file parses
    path.write_text(path.read_text().replace("30 sec", "30s"))
    result = streamgate("validate", str(path))
    assert result.stdout.splitlines() == [
        f"{path}:7:15: routes[0].upstream: unknown upstream 'local-gpus' (did you mean 'local-gpu'?)"
    ]


def test_validate_reports_a_missing_file():
    result = streamgate("validate", "no/such.yaml")
    assert result.returncode == 1
    assert result.stdout.startswith("no/such.yaml:1:1: ")


def test_explain_says_which_route_matches_and_why_earlier_ones_did_not(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(
        textwrap.dedent("""\
        upstreams:
          gpu: {kind: http, endpoints: [{url: "http://10.0.0.1:8000"}, {url: "http://10.0.0.2:8000", weight: 2}]}
          hosted: {kind: http, endpoints: [{url: "https://api.example.com"}]}
        limits:
          concurrency:
            slots: {capacity: 64, weights: {stream: 3, unary: 1}}
          rate:
            per-key: {rate: 60, per: 60s, key: "header:authorization"}
        routes:
          - name: embeddings
            match: {path: /v1/embeddings}
            upstream: gpu
          - name: acme-llama
            match: {path: /v1/chat/completions, model: "llama-*", headers: {x-tenant: acme}}
            upstream: gpu
          - name: chat
            match: {path: /v1/chat/completions, methods: [POST]}
            upstream: gpu
            fallbacks: [{upstream: hosted, model: gpt-4o-mini}]
            limits: [slots, per-key]
            retry: {attempts: 2}
    """)
    )
    result = streamgate(
        "explain",
        str(path),
        "--method",
        "POST",
        "--path",
        "/v1/chat/completions",
        "--header",
        "x-tenant: other",
        "--body",
        '{"model": "llama-3", "stream": true}',
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "routes[0] 'embeddings': no, path '/v1/chat/completions' is not '/v1/embeddings'" in out
    assert "routes[1] 'acme-llama': no, header x-tenant is 'other', not 'acme'" in out
    assert "routes[2] 'chat': matches" in out
    assert "kind: stream" in out
    assert "per-key: rate 60 per 60s keyed by header:authorization" in out
    assert "slots: concurrency, weight 3 of 64 units" in out
    assert out.index("per-key:") < out.index("slots:")  # rate limits are charged first
    assert "1. gpu: http, least_outstanding over http://10.0.0.1:8000 (weight 1)" in out
    assert "2. hosted: http" in out and "model rewritten to 'gpt-4o-mini'" in out
    assert "retry: up to 2 tries per upstream" in out
    assert "framing: auto (sse for text/event-stream" in out


def test_explain_with_no_matching_route_says_404(tmp_path):
    result = streamgate("explain", "config/gateway.yaml", "--method", "GET", "--path", "/nope")
    assert result.returncode == 0
    assert "no route matches: the gateway answers 404" in result.stdout


def test_serve_refuses_an_invalid_config_before_listening(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("upstreams: {}\nroutes: []\nbogus: 1\n")
    result = streamgate("serve", "--config", str(path))
    assert result.returncode == 1
    assert f"{path}:3:1: bogus: unknown key 'bogus'" in result.stderr


async def test_the_production_runner_cancels_the_handler_when_the_client_leaves(tmp_path):
    """`streamgate serve`, as shipped: a client that goes away mid-stream closes the upstream."""
    async with ScriptedUpstream() as up:
        up.script(Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]))
        path = tmp_path / "gw.yaml"
        path.write_text(
            "server: {listen: 127.0.0.1:0}\nadmin: {listen: 127.0.0.1:0}\n"
            f'upstreams:\n  up: {{kind: http, endpoints: [{{url: "{up.url}"}}]}}\n'
            "routes:\n  - {name: r, upstream: up, match: {path_prefix: /}}\n"
        )
        async with GatewayProcess(path) as gw, aiohttp.ClientSession() as session:
            async with session.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
                await resp.content.readuntil(b"a ")
                left_at = time.monotonic()
            # leaving the block closed the half-read response's connection
            (event,) = await up.wait_for_closed_events(1, timeout=2)
            assert event.mid_response
            assert event.at - left_at < 0.5
            assert await gw.stop() == 0


async def test_sigterm_drains_and_exits_zero(tmp_path):
    async with ScriptedUpstream() as up:
        up.default = Respond(json={})
        path = tmp_path / "gw.yaml"
        path.write_text(
            "server: {listen: 127.0.0.1:0, shutdown_grace: 5s}\nadmin: {listen: 127.0.0.1:0}\n"
            f'upstreams:\n  up: {{kind: http, endpoints: [{{url: "{up.url}"}}]}}\n'
            "routes:\n  - {name: r, upstream: up, match: {path_prefix: /}}\n"
        )
        gw = GatewayProcess(path)
        await gw.start()
        assert await asyncio.wait_for(gw.stop(), 10) == 0
