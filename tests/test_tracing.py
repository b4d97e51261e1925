"""Tracing: a server span per request (child of the client's W3C traceparent), a client span per
upstream attempt (whose traceparent the upstream gets), the events and attributes an operator
reads; the OTLP/HTTP exporter really sends; and tracing off is a shared no-op that allocates
nothing."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

import pytest
from aiohttp import web
from multidict import CIMultiDict
from opentelemetry import trace as otel
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.config.loader import load_config_text
from gateway.config.model import TracingConfig
from gateway.engine.context import RequestContext
from gateway.observe.tracing import NO_TRACING, NULL_ATTEMPT, NULL_TRACE, Tracing
from tests.conftest import chat_body, config_yaml
from tests.support.scripted_upstream import Respond, sse_tokens

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
SAMPLED = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
NOT_SAMPLED = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"

ROUTE = load_config_text(config_yaml("http://127.0.0.1:1"), "t.yaml", env={}).routes[0]


def _context(path: str = "/v1/chat/completions?api=x") -> RequestContext:
    loop = asyncio.get_running_loop()
    return RequestContext("req-1", "POST", path, "127.0.0.1", loop)


def _committed(ctx: RequestContext, status: int = 200, ttfc: float = 0.05) -> None:
    """What the pipeline leaves in ctx after a stream that went well."""
    ctx.route, ctx.upstream, ctx.endpoint = ROUTE, "up", "http://10.0.0.1:8000"
    ctx.status, ctx.stream, ctx.model = status, True, "llama-3"
    ctx.first_chunk_at = ctx.started + ttfc
    ctx.chunks, ctx.bytes = 5, 1234


def _sampled(traceparent: str) -> bool:
    # Bit 0 is "sampled"; a trace the SDK started also sets bit 1, "random" (W3C level 2).
    return bool(int(traceparent.rsplit("-", 1)[1], 16) & 0x01)


def _traceparent(span) -> str:
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


@pytest.fixture
def recorded():
    """A Tracing exporting each span to memory the moment it ends."""
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting_to(exporter, batch=False)
    yield tracing, exporter
    tracing.shutdown()


def _by_kind(exporter: InMemorySpanExporter):
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.kind is otel.SpanKind.SERVER]
    clients = sorted(
        (s for s in spans if s.kind is otel.SpanKind.CLIENT),
        key=lambda s: s.attributes["streamgate.attempt"],
    )
    assert len(server) == 1 and len(server) + len(clients) == len(spans)
    return server[0], clients


# ----------------------------------------------------------------- span structure


async def test_a_request_is_a_server_span_under_the_clients_trace_with_a_span_per_attempt(
    recorded,
):
    tracing, exporter = recorded
    ctx = _context()
    headers = CIMultiDict({"traceparent": SAMPLED, "x-request-id": "req-1"})
    trace = tracing.request_span(ctx, headers)
    first = trace.attempt("up", "http://10.0.0.1:8000", headers)
    sent_first = headers["traceparent"]
    first.failed("upstream_error", "503", status=503)
    trace.retry("503")
    second = trace.attempt("up", "http://10.0.0.2:8000", headers, "retry", "503")
    sent_second = headers["traceparent"]
    second.answered(200)
    _committed(ctx)
    ctx.attempts = 2
    trace.end(ctx)

    server, (one, two) = _by_kind(exporter)
    assert server.name == "POST r"
    assert f"{server.context.trace_id:032x}" == CLIENT_TRACE
    assert f"{server.parent.span_id:016x}" == CLIENT_SPAN and server.parent.is_remote
    assert dict(server.attributes) == {
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",  # never the query string
        "streamgate.request_id": "req-1",
        "streamgate.route": "r",
        "streamgate.upstream": "up",
        "streamgate.endpoint": "http://10.0.0.1:8000",
        "http.response.status_code": 200,
        "streamgate.stream": True,
        "streamgate.attempts": 2,
        "streamgate.chunks": 5,
        "streamgate.bytes": 1234,
        "streamgate.outcome": "completed",
        "gen_ai.request.model": "llama-3",
    }
    assert server.status.status_code is otel.StatusCode.UNSET
    assert [e.name for e in server.events] == ["retry", "first_chunk"]
    retry, first_chunk = server.events
    assert dict(retry.attributes) == {"streamgate.reason": "503", "streamgate.attempt": 1}
    assert first_chunk.attributes["streamgate.time_to_first_chunk_s"] == pytest.approx(0.05)
    # The event sits where the first chunk came, not where the span ended.
    assert first_chunk.timestamp - server.start_time == pytest.approx(0.05e9, abs=0.03e9)

    for attempt, number, sent in ((one, 1, sent_first), (two, 2, sent_second)):
        assert attempt.name == "POST up"
        assert attempt.parent.span_id == server.context.span_id
        assert attempt.context.trace_id == server.context.trace_id
        assert attempt.attributes["streamgate.attempt"] == number
        assert sent == _traceparent(attempt)  # what the upstream got names this attempt
    assert dict(one.attributes) == {
        "http.request.method": "POST",
        "streamgate.upstream": "up",
        "streamgate.endpoint": "http://10.0.0.1:8000",
        "streamgate.attempt": 1,
        "streamgate.try": "first",
        "http.response.status_code": 503,
        "streamgate.outcome": "upstream_error",
        "error.type": "503",
    }
    assert one.status.status_code is otel.StatusCode.ERROR
    assert (two.attributes["streamgate.try"], two.attributes["streamgate.try_reason"]) == (
        "retry",
        "503",
    )
    assert two.attributes["streamgate.endpoint"] == "http://10.0.0.2:8000"
    assert two.attributes["streamgate.outcome"] == "ok"
    assert two.attributes["http.response.status_code"] == 200
    assert two.status.status_code is otel.StatusCode.UNSET
    # An attempt that answered lasts as long as the exchange it opened: to the last byte.
    assert one.end_time <= two.start_time and two.end_time <= server.end_time


async def test_without_a_client_traceparent_the_request_starts_a_trace(recorded):
    tracing, exporter = recorded
    ctx = _context()
    headers = CIMultiDict()
    trace = tracing.request_span(ctx, headers)
    trace.attempt("up", "http://e", headers).answered(200)
    _committed(ctx)
    trace.end(ctx)
    server, (attempt,) = _by_kind(exporter)
    assert server.parent is None
    assert headers["traceparent"] == _traceparent(attempt)
    assert _sampled(headers["traceparent"])


@pytest.mark.parametrize(
    "traceparent",
    ["garbage", f"00-{'0' * 32}-{CLIENT_SPAN}-01", f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01"],
    ids=["not-a-traceparent", "zero-trace-id", "forbidden-version"],
)
async def test_an_invalid_client_traceparent_is_ignored(recorded, traceparent):
    tracing, exporter = recorded
    ctx = _context()
    headers = CIMultiDict({"traceparent": traceparent})
    trace = tracing.request_span(ctx, headers)
    trace.attempt("up", "http://e", headers).answered(200)
    trace.end(ctx)
    server, (attempt,) = _by_kind(exporter)
    assert server.parent is None
    assert headers["traceparent"] == _traceparent(attempt)


async def test_the_clients_tracestate_travels_upstream(recorded):
    tracing, _ = recorded
    headers = CIMultiDict({"traceparent": SAMPLED, "tracestate": "vendor=abc,other=1"})
    trace = tracing.request_span(_context(), headers)
    trace.attempt("up", "http://e", headers)
    assert headers["tracestate"] == "vendor=abc,other=1"
    assert headers["traceparent"].startswith(f"00-{CLIENT_TRACE}-")


@pytest.mark.parametrize(
    "ratio, client, exported",
    [
        pytest.param(1.0, None, 2, id="ratio-1-new-trace"),
        pytest.param(0.0, None, 0, id="ratio-0-new-trace"),
        pytest.param(0.0, SAMPLED, 2, id="sampled-parent-is-followed"),
        pytest.param(1.0, NOT_SAMPLED, 0, id="unsampled-parent-is-followed"),
    ],
)
async def test_sampling_is_parent_based_then_by_ratio(ratio, client, exported):
    exporter = InMemorySpanExporter()
    tracing = Tracing.exporting_to(exporter, sample_ratio=ratio, batch=False)
    ctx = _context()
    headers = CIMultiDict({"traceparent": client} if client else {})
    trace = tracing.request_span(ctx, headers)
    trace.attempt("up", "http://e", headers).answered(200)
    _committed(ctx)
    trace.end(ctx)
    tracing.shutdown()
    assert len(exporter.get_finished_spans()) == exported
    # Sampled or not, the upstream gets a valid traceparent continuing the same trace.
    version, trace_id, span_id, _ = headers["traceparent"].split("-")
    assert version == "00" and _sampled(headers["traceparent"]) == bool(exported)
    assert int(trace_id, 16) and int(span_id, 16) and span_id != CLIENT_SPAN
    if client:
        assert trace_id == CLIENT_TRACE


# ----------------------------------------------------------------- how requests end


async def test_a_client_that_leaves_mid_attempt_ends_both_spans_with_an_event(recorded):
    tracing, exporter = recorded
    ctx = _context()
    headers = CIMultiDict()
    trace = tracing.request_span(ctx, headers)
    trace.attempt("up", "http://e", headers)  # never answers: the client goes away
    ctx.route, ctx.upstream, ctx.endpoint = ROUTE, "up", "http://e"
    ctx.status, ctx.outcome = 499, "client_disconnect"
    trace.end(ctx)
    server, (attempt,) = _by_kind(exporter)
    assert [e.name for e in server.events] == ["client_disconnect"]
    assert server.attributes["streamgate.outcome"] == "client_disconnect"
    assert server.attributes["http.response.status_code"] == 499
    assert server.status.status_code is otel.StatusCode.UNSET  # the client's doing
    assert attempt.attributes["streamgate.outcome"] == "client_disconnect"
    assert attempt.end_time is not None


async def test_a_stream_that_breaks_after_the_commit_is_an_error_on_both_spans(recorded):
    tracing, exporter = recorded
    ctx = _context()
    headers = CIMultiDict()
    trace = tracing.request_span(ctx, headers)
    trace.attempt("up", "http://e", headers).answered(200)
    _committed(ctx)
    ctx.outcome, ctx.error_kind = "timeout", "chunk_gap_timeout"
    trace.end(ctx)
    server, (attempt,) = _by_kind(exporter)
    for span in (server, attempt):
        assert span.status.status_code is otel.StatusCode.ERROR
        assert span.attributes["error.type"] == "chunk_gap_timeout"
        assert span.attributes["streamgate.outcome"] == "timeout"
    assert server.attributes["http.response.status_code"] == 200  # sent before it broke


async def test_a_refusal_before_any_upstream_is_a_lone_server_span(recorded):
    tracing, exporter = recorded
    ctx = _context()
    trace = tracing.request_span(ctx, CIMultiDict())
    ctx.status, ctx.outcome, ctx.error_kind = 404, "rejected", "no_route"
    trace.end(ctx)
    server, attempts = _by_kind(exporter)
    assert attempts == [] and server.name == "POST"  # no route: named by method only
    assert server.attributes["streamgate.route"] == ""
    assert server.attributes["error.type"] == "no_route"
    assert server.status.status_code is otel.StatusCode.UNSET  # a 4xx is not our error
    assert server.events == ()


async def test_values_from_requests_are_bounded(recorded):
    tracing, exporter = recorded
    ctx = _context("/v1/" + "p" * 5000)
    trace = tracing.request_span(ctx, CIMultiDict())
    ctx.model = "m" * 5000
    trace.end(ctx)
    server, _ = _by_kind(exporter)
    assert len(server.attributes["url.path"]) == 256
    assert len(server.attributes["gen_ai.request.model"]) == 256


# ----------------------------------------------------------------- setup from config


async def test_each_tracing_has_its_own_provider_never_the_global_one():
    before = otel.get_tracer_provider()
    a_spans, b_spans = InMemorySpanExporter(), InMemorySpanExporter()
    a = Tracing.exporting_to(a_spans, batch=False)
    b = Tracing.exporting_to(b_spans, batch=False)
    ctx = _context()
    a.request_span(ctx, CIMultiDict()).end(ctx)
    assert (len(a_spans.get_finished_spans()), len(b_spans.get_finished_spans())) == (1, 0)
    assert otel.get_tracer_provider() is before
    assert a.provider is not b.provider
    assert a.provider.resource.attributes["service.name"] == "streamgate"
    a.shutdown()
    b.shutdown()


async def test_the_service_name_can_be_set_from_the_environment(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "gateway-eu-1")
    tracing = Tracing.exporting_to(InMemorySpanExporter(), batch=False)
    assert tracing.provider.resource.attributes["service.name"] == "gateway-eu-1"
    tracing.shutdown()


async def test_sample_ratio_comes_from_the_config():
    text = config_yaml("http://127.0.0.1:1").replace(
        "telemetry: {access_log: off}",
        "telemetry:\n  access_log: off\n"
        "  tracing: {exporter: otlp, endpoint: 'http://127.0.0.1:4318/v1/traces',"
        " sample_ratio: 0.25}",
    )
    config = load_config_text(text, "t.yaml", env={})
    tracing = Tracing.from_config(config.telemetry.tracing)
    try:
        assert tracing.enabled
        description = tracing.provider.sampler.get_description()
        assert description.startswith("ParentBased{root:TraceIdRatioBased{0.25}")
    finally:
        tracing.shutdown()


async def test_the_console_exporter_writes_one_json_line_per_span(capsys):
    tracing = Tracing.from_config(TracingConfig(exporter="console"))
    ctx = _context()
    trace = tracing.request_span(ctx, CIMultiDict())
    _committed(ctx)
    trace.end(ctx)
    await tracing.aclose()  # flushes from a thread
    (line,) = capsys.readouterr().out.splitlines()
    span = json.loads(line)
    assert span["name"] == "POST r"
    assert span["attributes"]["streamgate.route"] == "r"


class FakeCollector:
    """An OTLP/HTTP receiver on 127.0.0.1: records every POST /v1/traces."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.content_types: list[str] = []
        self.received = asyncio.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.requests.append(export)
        self.content_types.append(request.content_type)
        self.received.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    def spans(self) -> list:
        return [
            span
            for export in self.requests
            for resource in export.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    async def __aenter__(self) -> FakeCollector:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/v1/traces"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
def no_proxy(monkeypatch):
    """The exporter speaks through `requests`, which honours proxy variables."""
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


async def test_the_otlp_exporter_sends_spans_to_the_configured_endpoint(no_proxy):
    async with FakeCollector() as collector:
        tracing = Tracing.from_config(TracingConfig(exporter="otlp", endpoint=collector.url))
        ctx = _context()
        headers = CIMultiDict({"traceparent": SAMPLED})
        trace = tracing.request_span(ctx, headers)
        trace.attempt("up", "http://e", headers).answered(200)
        _committed(ctx)
        trace.end(ctx)
        # The exporter's thread posts while this loop serves the collector; shutdown flushes.
        await asyncio.wait_for(tracing.aclose(), 10)
        await asyncio.wait_for(collector.received.wait(), 10)
    assert collector.content_types == ["application/x-protobuf"]
    (resource,) = collector.requests[0].resource_spans
    names = {a.key: a.value.string_value for a in resource.resource.attributes}
    assert names["service.name"] == "streamgate"
    spans = {span.name: span for span in collector.spans()}
    assert set(spans) == {"POST r", "POST up"}
    assert spans["POST r"].trace_id.hex() == CLIENT_TRACE
    assert spans["POST up"].parent_span_id == spans["POST r"].span_id


# ----------------------------------------------------------------- tracing off


def _one_request(tracing, ctx, headers) -> None:
    """Every tracing call the pipeline makes for a request with a retry."""
    trace = tracing.request_span(ctx, headers)
    trace.attempt("up", "http://e", headers).failed("upstream_error", "503", 503)
    trace.retry("503")
    trace.attempt("up", "http://e", headers).answered(200)
    trace.end(ctx)


async def test_exporter_none_is_the_shared_no_op():
    tracing = Tracing.from_config(TracingConfig())
    assert tracing is NO_TRACING and not tracing.enabled
    headers = CIMultiDict({"traceparent": SAMPLED})
    assert tracing.request_span(_context(), headers) is NULL_TRACE
    assert tracing.request_span(_context(), headers) is NULL_TRACE
    assert NULL_TRACE.attempt("up", "http://e", headers) is NULL_ATTEMPT
    _one_request(tracing, _context(), headers)
    assert headers == CIMultiDict({"traceparent": SAMPLED})  # the client's, untouched
    await tracing.aclose()


async def test_tracing_off_allocates_nothing_per_request():
    ctx, headers = _context(), CIMultiDict({"traceparent": SAMPLED})
    _one_request(NO_TRACING, ctx, headers)  # warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(10_000):
            _one_request(NO_TRACING, ctx, headers)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Ten thousand requests' worth of calls: nothing kept, nothing but loop noise at peak.
    assert after - before < 256
    assert peak - before < 1024


# ----------------------------------------------------------------- through the gateway


_wired = "trace" in RequestContext.__slots__
needs_wiring = pytest.mark.skipif(not _wired, reason="tracing is not wired into the pipeline yet")


async def test_tracing_off_passes_the_clients_traceparent_upstream(start_gateway, upstream, client):
    upstream.script(Respond(sse=True, chunks=sse_tokens(["a "])))
    gw = await start_gateway(config_yaml(upstream.url))
    async with client.post(
        gw.url + "/v1/chat/completions", json=chat_body(), headers={"traceparent": SAMPLED}
    ) as resp:
        await resp.read()
    (seen,) = await upstream.wait_for_requests(1)
    assert seen.headers["traceparent"] == SAMPLED


@needs_wiring
async def test_a_traced_gateway_continues_the_clients_trace_upstream_and_exports_it(
    start_gateway, upstream, client, no_proxy
):
    upstream.script(Respond(status=503, body=b""), Respond(sse=True, chunks=sse_tokens(["a "])))
    async with FakeCollector() as collector:
        tracing = f"tracing: {{exporter: otlp, endpoint: '{collector.url}'}}"
        cfg = config_yaml(
            upstream.url, route="retry: {attempts: 2, backoff: {base: 1ms, max: 1ms}}\n"
        ).replace("telemetry: {access_log: off}", f"telemetry: {{access_log: off, {tracing}}}")
        gw = await start_gateway(cfg)
        async with client.post(
            gw.url + "/v1/chat/completions", json=chat_body(), headers={"traceparent": SAMPLED}
        ) as resp:
            assert resp.status == 200
            await resp.read()
        first, second = await upstream.wait_for_requests(2)
        await asyncio.to_thread(gw.runtime.tracing.force_flush)
        await asyncio.wait_for(collector.received.wait(), 10)
    spans = collector.spans()
    server = next(s for s in spans if s.kind == s.SPAN_KIND_SERVER)
    attempts = sorted(
        (s for s in spans if s.kind == s.SPAN_KIND_CLIENT), key=lambda s: s.start_time_unix_nano
    )
    assert server.trace_id.hex() == CLIENT_TRACE and server.parent_span_id.hex() == CLIENT_SPAN
    assert [a.parent_span_id for a in attempts] == [server.span_id] * 2
    assert [e.name for e in server.events] == ["retry", "first_chunk"]
    for seen, attempt in zip((first, second), attempts, strict=True):
        assert seen.headers["traceparent"] == f"00-{CLIENT_TRACE}-{attempt.span_id.hex()}-01"
