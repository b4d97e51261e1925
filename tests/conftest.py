"""Fixtures: a gateway over real sockets, a scriptable upstream, an HTTP client.

`start_gateway(yaml)` runs the real `Gateway` (the production listeners) inside the test's
event loop, listening on 127.0.0.1 ports of its own. Tests that need a separate process
(signals, the CLI) use `GatewayProcess`. `redis_url` is a Redis for the module's tests.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config.loader import load_config_text
from tests.support.procs import Subprocess
from tests.support.redis_server import RedisServer
from tests.support.scripted_upstream import ScriptedUpstream


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    admin_url: str

    @property
    def runtime(self):
        return self.gateway.runtime


def config_yaml(
    upstream_urls: str | list[str],
    route: str = "",
    upstream: str = "",
    top: str = "",
    extra_upstreams: str = "",
    server: str = "",
) -> str:
    """One upstream `up` and one catch-all route `r`; the strings add YAML to each part
    (`server` adds flow-mapping entries to the server block, e.g. "max_request_body: 1KiB")."""
    urls = [upstream_urls] if isinstance(upstream_urls, str) else upstream_urls
    endpoints = ", ".join(f'{{url: "{u}"}}' for u in urls)
    return (
        f"server: {{listen: 127.0.0.1:0{', ' + server if server else ''}}}\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "telemetry: {access_log: off}\n"
        + textwrap.dedent(top)
        + "upstreams:\n"
        + "  up:\n    kind: http\n"
        + f"    endpoints: [{endpoints}]\n"
        + textwrap.indent(textwrap.dedent(upstream), "    ")
        + textwrap.indent(textwrap.dedent(extra_upstreams), "  ")
        + "routes:\n  - name: r\n    upstream: up\n    match: {path_prefix: /}\n"
        + textwrap.indent(textwrap.dedent(route), "    ")
    )


def http_upstream(name: str, url: str) -> str:
    """One more `kind: http` upstream, for `config_yaml(extra_upstreams=...)`."""
    return f'{name}: {{kind: http, endpoints: [{{url: "{url}"}}]}}\n'


@pytest.fixture
async def start_gateway():
    running: list[Gateway] = []

    async def start(yaml_text: str) -> RunningGateway:
        config = load_config_text(yaml_text, "test.yaml", env={})
        gateway = Gateway("test.yaml", config)
        url, admin_url = await gateway.start()
        running.append(gateway)
        return RunningGateway(gateway, url, admin_url)

    yield start
    for gateway in running:
        await gateway.stop()


@pytest.fixture
async def upstream():
    async with ScriptedUpstream() as up:
        yield up


@pytest.fixture
async def client():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


ANNOUNCE = re.compile(r"listening on (?P<url>http://\S+) \(admin (?P<admin>http://\S+)\)")


class GatewayProcess(Subprocess):
    """`python -m gateway serve --config PATH` as a real child process."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
            env=env,
            announce=ANNOUNCE,
        )

    @property
    def admin_url(self) -> str:
        assert self.announced is not None
        return self.announced["admin"]

    async def _wait_healthy(self) -> None:
        # The proxy listener has no health path of its own; the admin one does. The
        # announcement is printed once both listen, so one probe is enough.
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.admin_url + "/healthz") as response,
        ):
            assert response.status == 200


def chat_body(stream: bool = True, model: str = "m", **extra) -> dict:
    return {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
        **extra,
    }


@pytest.fixture(scope="module")
def redis_url():
    """Any Redis the tests may use: REDIS_URL, or a private redis-server for this module."""
    if external := os.environ.get("REDIS_URL"):
        yield external
        return
    with RedisServer() as server:
        yield server.url
