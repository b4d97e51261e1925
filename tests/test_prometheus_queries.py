"""Every PromQL expression the operators get, run by a real Prometheus against a real gateway.

A private `prometheus` (free port on 127.0.0.1, temporary storage, 1 s scrapes) scrapes a
gateway serving a short mixed load: streams that report token usage, unary answers, a 404 and
rate-limited requests. Then each query of the Grafana dashboard (panels, annotations, template
variables) and each alert rule goes through Prometheus' HTTP API: all must parse and evaluate,
the panels this load exercises must return series, and the alerts answer as this load says
they should. Bounded: about ten seconds.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import chat_body
from tests.support.redis_server import free_port
from tests.support.scripted_upstream import (
    Respond,
    Sleep,
    content,
    done,
    role_delta,
    usage_chunk,
)
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "helm/streamgate/dashboards/streamgate.json"
RULES = ROOT / "helm/streamgate/alerts/streamgate.rules.yaml"
START_TIMEOUT_S = 15
SCRAPE_WAIT_S = 15

# Grafana fills these in before a query reaches Prometheus; "All" is the regex `.*`.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$route": ".*",
    "$upstream": ".*",
    "$instance": ".*",
}

# Panels whose series this load creates (the rest must parse; they may be empty here: no
# retries, stalls, reloads, worker pools or 5xx in this load).
EXERCISED_PANELS = {
    "Requests per second by route and status",
    "Streams and unary requests",
    "Time to first chunk p50 / p95 / p99",
    "Time to first chunk p95 by route and upstream",
    "Chunk gap p99 by route",
    "Stream duration p95 by outcome",
    "Chunks per stream p50 / p95",
    "Active streams by route",
    "Stream endings per second by outcome",
    "Concurrency units in use vs capacity",
    "Queue depth (requests waiting for units)",
    "Queue wait p50 / p95",
    "Rate-limited requests per second",
    "Admission refusals per second by route",
    "Upstream attempts per second by outcome",
    "Endpoint health",
    "Shared state (Redis) up by replica",
    "Tokens per second by route and type",
    "Output tokens per second per stream p50 / p95",
    "Token budget: tokens reserved vs settled per second",
    "Token budget refusals per second by limit",
    "Streams ended by a token cap per second",
    "Replicas with shared state degraded",
}
# Alert expressions with a series under this load (a third of its requests are rate-limited);
# the others must stay empty: nothing else is wrong with this gateway.
FIRING_UNDER_LOAD = {"StreamgateRateLimitedShareHigh"}

GATEWAY_YAML = """
server: {listen: 127.0.0.1:0}
admin: {listen: 127.0.0.1:0}
telemetry: {access_log: off}
upstreams:
  llm: {kind: http, endpoints: [{url: "UPSTREAM"}]}
limits:
  concurrency:
    slots: {capacity: 2, weights: {stream: 2, unary: 1}}   # one stream at a time: the second queues
  rate:
    tight: {rate: 1, per: 60s}
  tokens:   # a stream's estimate (max_tokens 5000) takes the whole bucket; the next is refused
    tpm: {tokens: 1000, per: 60s, max_tokens_per_stream: 2}
routes:
  - {name: chat, upstream: llm, match: {path: /v1/chat/completions}, limits: [slots]}
  - {name: limited, upstream: llm, match: {path: /v1/limited}, limits: [tight]}
  - {name: budgeted, upstream: llm, match: {path: /v1/budgeted/chat/completions}, limits: [tpm]}
"""


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr.replace("$labels", ""), f"unknown variable in {expr!r}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and template variable query."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [q for p in dashboard["panels"] for q in [p, *p.get("panels", [])]]
    found = [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]
    found += [
        (f"annotation {a['name']}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(METRIC{...}, label): the selector part
            selector = re.fullmatch(r"label_values\((.*), *\w+\)", variable["definition"])[1]
            found.append((f"variable {variable['name']}", selector))
    return [(where, grafana_to_promql(expr)) for where, expr in found]


def alert_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r["alert"], r["expr"]) for g in groups for r in g["rules"]]


class Prometheus:
    """`prometheus` as a child process scraping one target every second."""

    def __init__(self, target: str, tmp: Path) -> None:
        self.binary = require_tool("prometheus")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "scrape_configs": [
                        {"job_name": "streamgate", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        self.argv = [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        self.log = tmp / "prometheus.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    async def query(self, session: aiohttp.ClientSession, promql: str) -> dict:
        async with session.get(self.url + "/api/v1/query", params={"query": promql}) as resp:
            return await resp.json()

    async def wait_until(self, session, promql: str, predicate, what: str, bound: float) -> None:
        """Poll a query until its result satisfies `predicate` (a scrape has landed)."""
        deadline = time.monotonic() + bound
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                answer = await self.query(session, promql)
                if answer.get("status") == "success" and predicate(answer["data"]["result"]):
                    return
            except (aiohttp.ClientConnectionError, aiohttp.ContentTypeError):
                pass  # not listening yet, or still starting (503 in plain text)
            assert time.monotonic() < deadline, f"no {what} within {bound}s"
            await asyncio.sleep(0.1)


async def send_load(session: aiohttp.ClientSession, upstream, url: str) -> int:
    """Two streams with usage at once (the second waits for concurrency units), a unary
    answer, a 404, twice the rate-limited route (1 per minute: at most one gets through) and
    twice the token-budgeted one (the first stream passes its cap of 2 tokens and is ended,
    the second is refused: the first took the whole budget); returns how many requests the
    gateway counted."""
    stream = Respond(
        sse=True,
        chunks=[role_delta(), content("a"), Sleep(0.05), content("b"), usage_chunk(5, 2), done()],
    )
    upstream.default = Respond(json={"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    upstream.script(stream, stream)

    async def post_chat(stream: bool) -> int:
        async with session.post(url + "/v1/chat/completions", json=chat_body(stream)) as resp:
            await resp.read()
            return resp.status

    chat = list(await asyncio.gather(post_chat(True), post_chat(True)))
    chat.append(await post_chat(False))
    other = {}
    for path in ("/v1/limited", "/nowhere", "/v1/limited"):
        async with session.post(url + path, json=chat_body(stream=False)) as resp:
            await resp.read()
            other.setdefault(path, []).append(resp.status)
    assert chat == [200, 200, 200] and other["/nowhere"] == [404], (chat, other)
    assert other["/v1/limited"] in ([200, 429], [429, 429]), other
    upstream.script(stream)
    budgeted = []
    for _ in range(2):
        body = chat_body(True, max_tokens=5000)
        async with session.post(url + "/v1/budgeted/chat/completions", json=body) as resp:
            budgeted.append((resp.status, b"event: error" in await resp.read()))
    assert budgeted == [(200, True), (429, False)], budgeted
    return len(chat) + 5


@pytest.fixture
async def scraped_gateway(start_gateway, upstream, tmp_path: Path):
    """(Prometheus, session) once two rounds of load have been scraped."""
    gw = await start_gateway(GATEWAY_YAML.replace("UPSTREAM", upstream.url))
    target = gw.admin_url.removeprefix("http://")
    prometheus = Prometheus(target, tmp_path)
    prometheus.start()
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await prometheus.wait_until(
                session, "up", lambda r: r and r[0]["value"][1] == "1", "first scrape", START_TIMEOUT_S
            )
            total = 0
            for _ in range(2):  # two rounds, each scraped: rates and quantiles have two points
                total += await send_load(session, upstream, gw.url)
                await prometheus.wait_until(
                    session,
                    "sum(streamgate_requests_total)",
                    lambda r, n=total: r and float(r[0]["value"][1]) == n,
                    f"scrape showing {total} requests",
                    SCRAPE_WAIT_S,
                )
            yield prometheus, session
    finally:
        prometheus.stop()


async def test_every_dashboard_and_alert_query_runs_on_real_prometheus(scraped_gateway):
    prometheus, session = scraped_gateway
    empty, failed = [], []
    for where, promql in dashboard_queries() + alert_queries():
        answer = await prometheus.query(session, promql)
        if answer["status"] != "success":
            failed.append(f"{where}: {answer.get('error')} in {promql!r}")
        elif not answer["data"]["result"]:
            empty.append(where)
    assert not failed, "\n".join(failed)

    panels_without_data = sorted(EXERCISED_PANELS & set(empty))
    assert not panels_without_data, f"exercised panels returned no series: {panels_without_data}"
    assert {w for w, _ in dashboard_queries()} >= EXERCISED_PANELS, "a listed panel was renamed"
    assert not [w for w in empty if w.startswith("variable ")], "a template variable is empty"

    alerting = {where for where, _ in alert_queries()} - set(empty)
    assert alerting == FIRING_UNDER_LOAD

    # ... and the check can fail: Prometheus rejects what does not parse.
    answer = await prometheus.query(session, "sum by (route (rate(streamgate_requests_total[1m]))")
    assert answer["status"] == "error" and answer["errorType"] == "bad_data"
