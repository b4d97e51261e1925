"""RequestContext: everything one request carries through the pipeline, in one slotted object."""

from __future__ import annotations

import os
from asyncio import AbstractEventLoop

from gateway.config.routes import Route
from gateway.engine import messages
from gateway.observe.spans import RequestTrace
from gateway.observe.tracing import NULL_TRACE, NullTrace

_MAX_REQUEST_ID = 128
CLIENT_CLOSED = 499
"""The status logged and counted for a request whose client went away first."""


def request_id_from(header_value: str | None) -> str:
    """Keep a sane client-supplied x-request-id, else make one."""
    if header_value and len(header_value) <= _MAX_REQUEST_ID and header_value.isprintable():
        return header_value
    if not _spare_ids:
        _make_ids()
    return _spare_ids.pop()


_spare_ids: list[str] = []
"""Request ids made ahead: 96 random bits each (24 hex digits), from one `os.urandom` call per
256 of them rather than a system call per request."""


def _make_ids() -> None:
    pool = os.urandom(12 * 256).hex()
    _spare_ids.extend(pool[i : i + 24] for i in range(0, len(pool), 24))


os.register_at_fork(after_in_child=_spare_ids.clear)  # a child never reuses its parent's ids


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
        "tries",
        "resumes",
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
        "token_cap",
        "hide_usage",
        "usage",
        "abort",
        "trace",
        "protocol",
        "upstream_protocol",
        "messages_in",
        "client_closed",
        "session",
        "loop",
    )

    def __init__(
        self, request_id: str, method: str, path: str, client_ip: str, loop: AbstractEventLoop
    ) -> None:
        self.request_id = request_id
        self.loop = loop
        """The loop serving the request: asked once, since on Python 3.11 each
        `asyncio.get_running_loop()` (and `current_task()`, `timeout()`) is a getpid call."""
        self.started = loop.time()
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
        self.tries: list = []
        """Every request sent upstream, in order (`order.Try`: upstream, endpoint, why,
        reason, result), for the access log."""
        self.resumes = 0
        """Times a broken stream was continued by another try."""
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
        self.token_cap: int | None = None
        """Completion tokens this stream may produce (the smallest `max_tokens_per_stream` of
        the token budgets charged), or None."""
        self.hide_usage = False
        """The gateway asked the upstream for stream usage the client did not ask for: the
        usage-only event is not relayed (`engine/usage_request.py`)."""
        self.usage: tuple[int, int] | None = None
        """(prompt, completion) tokens, where the upstream reported `usage`."""
        self.abort = None
        """Once committed: call with a GatewayError to end the stream visibly (shutdown)."""
        self.trace: RequestTrace | NullTrace = NULL_TRACE
        """This request's spans; the shared no-op when tracing is off."""
        self.protocol = "http"
        """The client's protocol: "http", "websocket" for a session, "grpc" for a gRPC call."""
        self.upstream_protocol = "http"
        """Which of its pool's protocol clients a try uses ("http", "websocket", "grpc",
        "grpc_bridge")."""
        self.messages_in = 0
        """Messages the client sent upstream during a two-way session."""
        self.client_closed: tuple[int, str] | None = None
        """A session's client closed it: (code, reason)."""
        self.session = None
        """A two-way session's client half (`duplex.ClientHalf`), shared by its tries and
        its relay; None for a one-way request."""

    def client_gone(self) -> None:
        """The client went away: counted as 499 and `client_disconnect`, unless it was a
        session's client that closed it on purpose first (the session is complete)."""
        if not messages.closed_on_purpose(self.client_closed):
            self.status, self.outcome = CLIENT_CLOSED, "client_disconnect"

    @property
    def route_name(self) -> str:
        return self.route.name if self.route is not None else ""
