"""The spans of one request: its server span, and a client span per upstream attempt."""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping

from opentelemetry import trace as otel
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.observe.request import ObservedRequest

_W3C = TraceContextTextMapPropagator()
"""W3C trace context only (traceparent, tracestate), whatever OTEL_PROPAGATORS says."""


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

    def abandoned(self, outcome: str) -> None:
        """Ended by the gateway, not by a failure of its own: another try of the request won
        the race to the first content (`hedge_lost`)."""
        if self.done:
            return
        self.span.set_attribute("streamgate.outcome", outcome)
        self.span.end()
        self.done = True

    def close(self, ctx: ObservedRequest) -> None:
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

    __slots__ = ("_tracer", "_span", "_as_parent", "_method", "_open", "_attempts")

    def __init__(
        self, tracer: otel.Tracer, ctx: ObservedRequest, headers: Mapping[str, str]
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
        self._open: list[AttemptTrace] = []
        """Attempts not ended yet: several while tries race (hedging)."""
        self._attempts = 0

    @property
    def span(self) -> otel.Span:
        return self._span

    def attempt(
        self,
        upstream: str,
        endpoint: str,
        headers: MutableMapping[str, str],
        why: str = "first",
        reason: str | None = None,
    ) -> AttemptTrace:
        """Start the span of the next try and write its `traceparent` into `headers`
        (the headers that try sends; a client's own `traceparent` is replaced). `why` is
        first, retry, hedge, resume or splice; `reason` what led to it."""
        self._attempts += 1
        attributes = {
            "http.request.method": self._method,
            "streamgate.upstream": upstream,
            "streamgate.endpoint": endpoint,
            "streamgate.attempt": self._attempts,
            "streamgate.try": why,
        }
        if reason is not None:
            attributes["streamgate.try_reason"] = reason
        span = self._tracer.start_span(
            f"{self._method} {upstream}",
            context=self._as_parent,
            kind=otel.SpanKind.CLIENT,
            attributes=attributes,
        )
        _W3C.inject(headers, context=otel.set_span_in_context(span))
        attempt = AttemptTrace(span)
        self._open = [a for a in self._open if not a.done]
        self._open.append(attempt)
        return attempt

    def retry(self, reason: str) -> None:
        """The try just failed for `reason`, and another try (or a fallback) may follow."""
        self._event("retry", reason)

    def hedge(self, after: float) -> None:
        """No content within `after` seconds: a hedge starts beside the running try."""
        self._span.add_event(
            "hedge", {"streamgate.after_s": after, "streamgate.attempt": self._attempts}
        )

    def resume(self, reason: str) -> None:
        """The committed stream broke for `reason`; a resume is asked for."""
        self._event("resume", reason)

    def _event(self, name: str, reason: str) -> None:
        self._span.add_event(
            name, {"streamgate.reason": reason, "streamgate.attempt": self._attempts}
        )

    def end(self, ctx: ObservedRequest) -> None:
        """End the request's span (and an attempt left open) from what `ctx` says."""
        for attempt in self._open:
            attempt.close(ctx)
        span = self._span
        if not span.is_recording():  # not sampled: nothing to describe
            span.end()
            return
        loop_now = ctx.loop.time()
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
