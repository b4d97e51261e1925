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
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

from gateway.config.model import TracingConfig
from gateway.observe.request import ObservedRequest
from gateway.observe.spans import RequestTrace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

SERVICE_NAME = "streamgate"
MAX_ATTRIBUTE_LENGTH = 256
"""Attribute values taken from requests (path, model) are cut to this many characters."""
OTLP_TIMEOUT_S = 5.0





# ----------------------------------------------------------------- tracing off


class NullAttempt:
    """The attempt of a request that is not traced."""

    __slots__ = ()

    def answered(self, status: int) -> None:
        pass

    def failed(self, outcome: str, reason: str, status: int | None = None) -> None:
        pass

    def abandoned(self, outcome: str) -> None:
        pass


class NullTrace:
    """The trace of a request when tracing is off: shared, stateless, every call empty."""

    __slots__ = ()

    def attempt(
        self,
        upstream: str,
        endpoint: str,
        headers: MutableMapping[str, str],
        why: str = "first",
        reason: str | None = None,
    ) -> NullAttempt:
        return NULL_ATTEMPT

    def retry(self, reason: str) -> None:
        pass

    def hedge(self, after: float) -> None:
        pass

    def resume(self, reason: str) -> None:
        pass

    def end(self, ctx: ObservedRequest) -> None:
        pass


class NoTracing:
    enabled = False

    __slots__ = ()

    def request_span(self, ctx: ObservedRequest, headers: Mapping[str, str]) -> NullTrace:
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

    def request_span(self, ctx: ObservedRequest, headers: Mapping[str, str]) -> RequestTrace:
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
