"""RequestContext: everything one request carries through the pipeline, in one slotted object."""

from __future__ import annotations

import os

from gateway.config.routes import Route
from gateway.observe.spans import RequestTrace
from gateway.observe.tracing import NULL_TRACE, NullTrace

_MAX_REQUEST_ID = 128
CLIENT_CLOSED = 499
"""The status logged and counted for a request whose client went away first."""


def request_id_from(header_value: str | None) -> str:
    """Keep a sane client-supplied x-request-id, else make one."""
    if header_value and len(header_value) <= _MAX_REQUEST_ID and header_value.isprintable():
        return header_value
    return os.urandom(12).hex()


class RequestContext:
    __slots__ = (
        "request_id",
        "started",
        "method",
        "path",
        "client_ip",
        "body",
        "json",
        "model",
        "stream",
        "route",
        "weight",
        "upstream",
        "endpoint",
        "attempts",
        "status",
        "outcome",
        "error_kind",
        "first_chunk_at",
        "chunks",
        "bytes",
        "buffered_chunks",
        "deadline",
        "rate_remaining",
        "token_budget",
        "usage",
        "abort",
        "trace",
        "protocol",
        "upstream_protocol",
        "messages_in",
        "client_closed",
    )

    def __init__(
        self, request_id: str, method: str, path: str, client_ip: str, started: float
    ) -> None:
        self.request_id = request_id
        self.started = started
        """Event-loop time the request arrived."""
        self.method = method
        self.path = path
        """Path and query as the client sent them (undecoded)."""
        self.client_ip = client_ip
        self.body: bytes = b""
        self.json: dict | None = None
        """The request body parsed as a JSON object, when it is one."""
        self.model: str | None = None
        self.stream = False
        self.route: Route | None = None
        self.weight = 0
        self.upstream: str | None = None
        """The upstream of the attempt that answered (or the last one tried)."""
        self.endpoint: str | None = None
        self.attempts = 0
        self.status = 0
        """HTTP status the client got; 499 when it went away first."""
        self.outcome = "completed"
        self.error_kind: str | None = None
        self.first_chunk_at: float | None = None
        self.chunks = 0
        self.bytes = 0
        self.buffered_chunks = 0
        self.deadline = float("inf")
        """Event-loop time at which `timeouts.total` (or the caller's own deadline, when its
        protocol sends one and it is sooner) runs out."""
        self.rate_remaining: tuple[int, int] | None = None
        """(limit, remaining) of the tightest rate limit charged, for x-ratelimit-* headers."""
        self.token_budget: tuple[int, int, float] | None = None
        """(size, remaining, seconds until full) of the tightest token budget charged, for
        x-ratelimit-*-tokens headers."""
        self.usage: tuple[int, int] | None = None
        """(prompt, completion) tokens, where the upstream reported `usage`."""
        self.abort = None
        """Once committed: call with a GatewayError to end the stream visibly (shutdown)."""
        self.trace: RequestTrace | NullTrace = NULL_TRACE
        self.protocol = "http"
        """The client's protocol: "http", "websocket" for a session, "grpc" for a gRPC call."""
        self.upstream_protocol = "http"
        """Which of its pool's protocol clients a try uses ("http", "websocket", "grpc",
        "grpc_bridge")."""
        self.messages_in = 0
        """Messages the client sent upstream during a two-way session."""
        self.client_closed: tuple[int, str] | None = None
        """A session's client closed it: (code, reason)."""
        """This request's spans; the shared no-op when tracing is off."""

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else ""
