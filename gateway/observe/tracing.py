"""OpenTelemetry tracing: a server span per request, a client span per upstream attempt.

    server  "POST chat-local"   arrival to the last byte written (or the client gone); its
                                parent is the client's W3C `traceparent`, when it sends one
      client "POST local-gpu"   one per try on an upstream; its context is the `traceparent`
                                the upstream receives

Events on the server span: `first_chunk` (the commit point), `retry` (with its reason),
`client_disconnect`. Attributes: route, upstream, endpoint, status, chunks, bytes, outcome.

Tracing off costs nothing on the hot path: with `exporter: none` the runtime holds
`NO_TRACING`, whose `request_span` hands back the shared `NULL_TRACE`, and every call on that
(or on the shared `NULL_ATTEMPT`) is an empty method: no allocation, no clock read, no header
parsing. The client's own `traceparent` then travels upstream untouched, as any other header.
Nothing here runs per chunk, on or off: the first-chunk time and the chunk and byte counts
are read from the RequestContext once, when the request ends.

Each `Tracing` owns a private TracerProvider, never the process-global one, so the runtime
of a reload, and every test, has its own; the old one is shut down with its runtime. Spans
leave through a BatchSpanProcessor, whose thread does the exporting: the event loop never
waits on a collector (`aclose` flushes from a thread for the same reason).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Protocol

from opentelemetry import trace as otel
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config.model import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

SERVICE_NAME = "streamgate"
MAX_ATTRIBUTE_LENGTH = 256
"""Attribute values taken from requests (path, model) are cut to this many characters."""
OTLP_TIMEOUT_S = 5.0



class RequestContext(Protocol):
    """What a span reads of a request: the engine's RequestContext, seen from below."""

    request_id: str
    method: str
    path: str
    route_name: str
    upstream: str | None
    endpoint: str | None
    model: str | None
    stream: bool
    status: int
    attempts: int
    chunks: int
    bytes: int
    outcome: str
    error_kind: str | None
    started: float
    first_chunk_at: float | None


_W3C = TraceContextTextMapPropagator()
"""W3C trace context only (traceparent, tracestate), whatever OTEL_PROPAGATORS says."""


# ----------------------------------------------------------------- tracing off


class NullAttempt:
    """The attempt of a request that is not traced."""

    __slots__ = ()

    def answered(self, status: int) -> None:
        pass

    def failed(self, outcome: str, reason: str, status: int | None = None) -> None:
        pass


class NullTrace:
    """The trace of a request when tracing is off: shared, stateless, every call empty."""

    __slots__ = ()

    def attempt(
        self, upstream: str, endpoint: str, headers: MutableMapping[str, str]
    ) -> NullAttempt:
        return NULL_ATTEMPT

    def retry(self, reason: str) -> None:
        pass

    def end(self, ctx: RequestContext) -> None:
        pass


class NoTracing:
    enabled = False

    __slots__ = ()

    def request_span(self, ctx: RequestContext, headers: Mapping[str, str]) -> NullTrace:
        return NULL_TRACE

    def force_flush(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


NULL_ATTEMPT = NullAttempt()
NULL_TRACE = NullTrace()
NO_TRACING = NoTracing()


# ----------------------------------------------------------------- tracing on


class Tracing:
    """Spans for one runtime, from its own TracerProvider."""

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("streamgate")

    @classmethod
    def from_config(cls, config: TracingConfig) -> Tracing | NoTracing:
        """`NO_TRACING` for `exporter: none`; else spans batched to stdout or OTLP/HTTP."""
        if config.exporter == "none":
            return NO_TRACING
        return cls.exporting_to(_exporter(config), config.sample_ratio)

    @classmethod
    def exporting_to(
        cls, exporter: SpanExporter, sample_ratio: float = 1.0, batch: bool = True
    ) -> Tracing:
        """A provider sampling new traces at `sample_ratio` (a sampled parent is always
        followed, an unsampled one never), exporting through `exporter`. Tests pass
        `batch=False` to get each span exported the moment it ends."""
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            resource=_resource(),
            span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE_LENGTH),
            shutdown_on_exit=False,  # the runtime shuts it down; atexit would keep it alive
        )
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(processor)
        return cls(provider)

    def request_span(self, ctx: RequestContext, headers: Mapping[str, str]) -> RequestTrace:
        """Start the server span of a request that has just arrived."""
        return RequestTrace(self._tracer, ctx, headers)

    def force_flush(self) -> bool:
        """Export every ended span now. Blocks: call it from a thread, not the event loop."""
        return self.provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop exporting. Blocks, like `force_flush`."""
        self.provider.shutdown()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.shutdown)


def _resource():
    """OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES apply; the service name defaults to ours."""
    from opentelemetry.sdk.resources import Resource

    detected = Resource.create()
    if str(detected.attributes.get("service.name", "")).startswith("unknown_service"):
        detected = detected.merge(Resource({"service.name": SERVICE_NAME}))
    return detected


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(
            service_name=SERVICE_NAME,
            out=sys.stdout,
            formatter=lambda span: span.to_json(indent=None) + "\n",
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # The endpoint is the whole URL, signal path included (…:4318/v1/traces).
    return OTLPSpanExporter(endpoint=config.endpoint, timeout=OTLP_TIMEOUT_S)


class AttemptTrace:
    """The client span of one try on an upstream.

    A failed try ends here and now. A try that answered stays open: the relay goes on reading
    this same upstream exchange, so the span ends with the request (`RequestTrace.end`).
    """

    __slots__ = ("span", "status", "done")

    def __init__(self, span: otel.Span) -> None:
        self.span = span
        self.status: int | None = None
        self.done = False

    def answered(self, status: int) -> None:
        self.status = status
        self.span.set_attribute("http.response.status_code", status)

    def failed(self, outcome: str, reason: str, status: int | None = None) -> None:
        span = self.span
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.set_attribute("streamgate.outcome", outcome)
        span.set_attribute("error.type", reason)
        span.set_status(otel.StatusCode.ERROR, reason)
        span.end()
        self.done = True

    def close(self, ctx: RequestContext) -> None:
        """End with the request: the relay's verdict on an answered try, or how an unfinished
        one was abandoned (client gone, total timeout)."""
        if self.done:
            return
        self.done = True
        span = self.span
        if self.status is None:
            span.set_attribute("streamgate.outcome", ctx.outcome)
        elif ctx.first_chunk_at is not None and ctx.error_kind is not None:
            span.set_attribute("streamgate.outcome", ctx.outcome)  # broke after the commit
            span.set_attribute("error.type", ctx.error_kind)
            span.set_status(otel.StatusCode.ERROR, ctx.error_kind)
        else:
            outcome = "ok" if self.status < 400 else "upstream_error"
            span.set_attribute("streamgate.outcome", outcome)
        span.end()


class RequestTrace:
    """The server span of one request, and the parent of its attempts' spans."""

    __slots__ = ("_tracer", "_span", "_as_parent", "_method", "_attempt", "_attempts")

    def __init__(
        self, tracer: otel.Tracer, ctx: RequestContext, headers: Mapping[str, str]
    ) -> None:
        self._tracer = tracer
        self._method = ctx.method
        self._span = tracer.start_span(
            ctx.method,
            context=_W3C.extract(headers),
            kind=otel.SpanKind.SERVER,
            attributes={
                "http.request.method": ctx.method,
                "url.path": ctx.path.split("?", 1)[0],
                "streamgate.request_id": ctx.request_id,
            },
        )
        self._as_parent = otel.set_span_in_context(self._span)
        self._attempt: AttemptTrace | None = None
        self._attempts = 0

    @property
    def span(self) -> otel.Span:
        return self._span

    def attempt(
        self, upstream: str, endpoint: str, headers: MutableMapping[str, str]
    ) -> AttemptTrace:
        """Start the span of the next try and write its `traceparent` into `headers`
        (the headers that try sends; a client's own `traceparent` is replaced)."""
        self._attempts += 1
        span = self._tracer.start_span(
            f"{self._method} {upstream}",
            context=self._as_parent,
            kind=otel.SpanKind.CLIENT,
            attributes={
                "http.request.method": self._method,
                "streamgate.upstream": upstream,
                "streamgate.endpoint": endpoint,
                "streamgate.attempt": self._attempts,
            },
        )
        _W3C.inject(headers, context=otel.set_span_in_context(span))
        self._attempt = AttemptTrace(span)
        return self._attempt

    def retry(self, reason: str) -> None:
        """The try just failed for `reason`, and another try (or a fallback) may follow."""
        self._span.add_event(
            "retry", {"streamgate.reason": reason, "streamgate.attempt": self._attempts}
        )

    def end(self, ctx: RequestContext) -> None:
        """End the request's span (and an attempt left open) from what `ctx` says."""
        if self._attempt is not None:
            self._attempt.close(ctx)
        span = self._span
        if not span.is_recording():  # not sampled: nothing to describe
            span.end()
            return
        loop_now = asyncio.get_running_loop().time()
        wall_now = time.time_ns()
        route = ctx.route_name
        if route:
            span.update_name(f"{ctx.method} {route}")
        if ctx.first_chunk_at is not None:
            span.add_event(
                "first_chunk",
                {"streamgate.time_to_first_chunk_s": ctx.first_chunk_at - ctx.started},
                timestamp=wall_now - int((loop_now - ctx.first_chunk_at) * 1e9),
            )
        if ctx.outcome == "client_disconnect":
            span.add_event("client_disconnect", timestamp=wall_now)
        attributes = {
            "streamgate.route": route,
            "streamgate.upstream": ctx.upstream or "",
            "streamgate.endpoint": ctx.endpoint or "",
            "http.response.status_code": ctx.status,
            "streamgate.stream": ctx.stream,
            "streamgate.attempts": ctx.attempts,
            "streamgate.chunks": ctx.chunks,
            "streamgate.bytes": ctx.bytes,
            "streamgate.outcome": ctx.outcome,
        }
        if ctx.model is not None:
            attributes["gen_ai.request.model"] = ctx.model
        if ctx.error_kind is not None:
            attributes["error.type"] = ctx.error_kind
        span.set_attributes(attributes)
        broke_after_commit = ctx.first_chunk_at is not None and ctx.error_kind is not None
        if ctx.status >= 500 or broke_after_commit:
            span.set_status(otel.StatusCode.ERROR, ctx.error_kind or str(ctx.status))
        span.end(end_time=wall_now)
