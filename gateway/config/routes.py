"""Route rules as frozen dataclasses: what a route matches, where it goes, and its policies.

Documented at each field, like the rest of the schema (`model.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.config.rescue import (  # noqa: F401 -- declared there, part of a route
    RESUME_CONDITIONS,
    HedgePolicy,
    ResumePolicy,
)
from gateway.config.units import Bytes, MiB, Seconds, frozen_map


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: str | None = None
    """Exact request path."""
    path_prefix: str | None = None
    """Request path prefix; exclusive with `path`."""
    methods: tuple[str, ...] | None = None
    """Upper-case HTTP methods; any method when absent."""
    model: str | None = None
    """Glob (`llama-*`) on the JSON body's "model"; a body without one never matches."""
    headers: Mapping[str, str] = field(default_factory=frozen_map)
    """Exact values; header names are case-insensitive."""


@dataclass(frozen=True, slots=True)
class Fallback:
    upstream: str
    model: str | None = None
    """Rewrites the request body's "model" for this hop."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    queue: Seconds = 5.0
    """Longest wait for concurrency units; separately, the longest wait of each try for one of
    its upstream's `max_connections` (that wait does not eat into connect or first_chunk)."""
    connect: Seconds = 2.0
    first_chunk: Seconds = 30.0
    """From request sent to the first content chunk (the commit point)."""
    chunk_gap: Seconds = 30.0
    """Longest upstream silence between two body chunks once committed."""
    total: Seconds = 600.0
    """The whole exchange, admission to last byte."""
    slow_client: Seconds = 30.0
    """How long a full buffer may wait for the client to drain."""


@dataclass(frozen=True, slots=True)
class Backoff:
    base: Seconds = 0.1
    max: Seconds = 2.0
    jitter: bool = True


DEFAULT_RETRY_ON = ("connect_error", "reset", "empty_body", "429", "500", "502", "503", "504")
DEFAULT_FALLBACK_ON = ("first_chunk_timeout", "context_length_exceeded")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    """Tries per upstream, the first included (3 = at most 3 requests to it)."""
    on: tuple[str, ...] = DEFAULT_RETRY_ON
    """Conditions retried on the same upstream: `connect_error`, `reset`, `empty_body`,
    `first_chunk_timeout`, `pool_exhausted`, a status code, an error code from the
    upstream's JSON error body, or a gRPC status name (`UNAVAILABLE`, `RESOURCE_EXHAUSTED`, ...;
    a gRPC status also matches its HTTP equivalent, UNAVAILABLE as `503`).
    Status codes are held as strings ("429")."""
    fallback_on: tuple[str, ...] = DEFAULT_FALLBACK_ON
    """Conditions that skip straight to the next fallback. Left out, it is the default minus
    the conditions written in `on`, so `on: [first_chunk_timeout]` retries that condition on
    the same upstream; written out, a condition may not be in both lists."""
    backoff: Backoff = Backoff()


@dataclass(frozen=True, slots=True)
class BufferConfig:
    chunks: int = 64
    bytes: Bytes = 1 * MiB


@dataclass(frozen=True, slots=True)
class FramingConfig:
    """How the gateway reads a response body: what a frame is, which frame commits, and how a
    failure after the commit point is shown. Written as a bare name (`framing: sse`) or a
    mapping (`framing: {kind: truss, require_footer: true}`)."""

    kind: Literal["auto", "sse", "ndjson", "raw", "unary", "truss"] = "auto"
    """`auto` picks by the response: `text/event-stream` is `sse`, `application/x-ndjson` or
    `application/jsonl` is `ndjson`, anything else `raw` when the request asked for a stream
    and `unary` when it did not. `sse`: an event is a frame, the first with content commits
    (a role-only delta does not), a failure after commit is an `event: error`. `ndjson`: a line
    is a frame. `raw`: bytes as they come. `unary`: the whole body is read before committing.
    `truss`: Baseten Truss Chains typed frames; the first ITEM commits (a header does not).
    After the commit point every framing but `sse` shows a failure by aborting the
    connection."""
    require_footer: bool = False
    """`truss` only: a stream that ends without a FOOTER frame is a truncation (aborted)."""


@dataclass(frozen=True, slots=True)
class AnswerEnd:
    """Which upstream message ends an answer. Written as a bare name, `finish_reason` (an
    OpenAI chat-completion chunk, as Inferneo sends, one of whose choices has its
    `finish_reason` set), or as `{match: {type: done}}` (a JSON object whose top-level fields
    have these string values, as Mullama's `{"type": "done"}`)."""

    kind: Literal["finish_reason", "match"] = "match"
    match: Mapping[str, str] = field(default_factory=frozen_map)
    """`kind: match`: top-level field → string value, all of which the end message has."""


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    """A route that accepts WebSocket sessions (`Upgrade: websocket`). Such a route matches
    only upgrade requests, and a route without this block never matches one, so no tunnel is
    opened that a route does not allow. A session is a stream: it holds its concurrency units
    (stream weight) for its whole life, and `timeouts.total` bounds it."""

    upstream: Literal["websocket", "sse"] = "websocket"
    """What the upstream speaks. `websocket`: the session is relayed to a WebSocket at the
    same path on the upstream (an `http://` endpoint is dialled as `ws://`, `https://` as
    `wss://`): text and binary messages unchanged both ways, close codes and reasons carried
    across, subprotocols negotiated end to end; a failed handshake (connect error, 5xx) is
    retried and falls back like any request. `sse`: a bridge to an OpenAI-style SSE endpoint:
    the client's first message is the request body, POSTed with `"stream": true`; each SSE
    `data:` event goes back as one text message; the stream's end (`data: [DONE]` or the body's
    end) sends `end_message` and closes with 1000; a failure after that closes with 1011."""
    max_message_size: Bytes = 1 * MiB
    """Largest message either side may send; a larger one closes that side with 1009 (message
    too big), and the other side with 1009 too."""
    idle: Seconds = 300.0
    """`upstream: websocket`: the longest the upstream may stay silent while no client message
    awaits an answer (from a client message to the upstream's next one, `timeouts.first_chunk`
    applies). Past it the session closes with 1001 (going away)."""
    end_message: str | None = "[DONE]"
    """`upstream: sse`: the text message sent when the SSE stream ends cleanly, before the
    1000 close; null sends none."""
    answer_end: AnswerEnd | None = None
    """`upstream: websocket`: the upstream message that ends an answer (see AnswerEnd). With
    it, an answer is in progress from its first upstream message until this one, and
    `timeouts.chunk_gap` bounds the silence between its messages (past it: 1011,
    `chunk_gap_timeout`); `idle` applies only between answers. Null (the default): the
    gateway cannot tell a finished answer from a stalled one, so `idle` bounds the silence
    after any upstream message."""
    replay_buffer: Bytes = 1 * MiB
    """`upstream: websocket`: client messages kept, in bytes, while no upstream message has
    reached the client, so a failed upstream (a reset, or silence past `first_chunk` after a
    client message) can be failed over to the next endpoint or fallback with them replayed.
    When full, the client is not read until the first upstream message (its next messages
    wait in TCP, nothing is dropped); one message larger than this is kept whole."""


@dataclass(frozen=True, slots=True)
class WebSocketUpstream:
    """An HTTP route whose upstream speaks WebSocket (Inferneo's `/v1/chat/completions`,
    Mullama's token stream): each try dials a WebSocket at the same path on the upstream
    (`http://` endpoints as `ws://`, `https://` as `wss://`) and sends the request body as its
    first text message; the answer is always SSE, one `data:` event per upstream message. The
    message `answer_end` names is relayed too and ends the stream cleanly, as does a 1000
    close; anything else (a dropped connection, another close code, a timeout) ends it with
    `event: error` once committed, and before the first event with content is retried and
    falls back like any try."""

    answer_end: AnswerEnd = AnswerEnd("finish_reason")
    """The upstream message that ends the answer (see AnswerEnd; default `finish_reason`)."""
    done_event: bool = True
    """End a clean stream with `data: [DONE]`, as OpenAI clients expect."""
    max_message_size: Bytes = 1 * MiB
    """Largest upstream message; a larger one is a cut (before the first event: a `reset`)."""


@dataclass(frozen=True, slots=True)
class GrpcRouteConfig:
    """A route for gRPC calls (from `server.grpc_listen`). Such a route matches only gRPC
    calls, and a route without this block never matches one. A call's route path is its
    method, `/package.Service/Method`: `match.path` names one exactly, `match.path_prefix`
    a service (`/package.Service/`), `method` a glob; `match.headers` matches its metadata.
    Its upstream and fallbacks are `kind: grpc`."""

    method: str = "*"
    """Glob on the full method name (`/blazerpc.InferenceService/Predict*`)."""
    stream: bool = True
    """Charge calls on this route the concurrency weight of a stream (true) or of a unary
    request (false). A relay cannot tell a server-streaming method from a unary one (both
    send one request message), so routes say it: put unary methods on a route of their own."""


@dataclass(frozen=True, slots=True)
class GrpcBridgeConfig:
    """An HTTP route whose upstream (`kind: grpc`) is a gRPC method: the JSON request body is
    transcoded to the request message, each response message goes back as one JSON event."""

    method: str
    """The full method name, `/package.Service/Method`."""
    descriptor_set: str | None = None
    """A FileDescriptorSet file (`protoc --include_imports --descriptor_set_out=FILE`) that
    describes the method, relative to the config file's directory; read when the config is
    loaded (a missing file or method is a config error). Absent: asked of the upstream by
    server reflection (`grpc.reflection.v1`, else `v1alpha`) on first use, and kept until a
    reload."""
    output: Literal["sse", "ndjson"] = "sse"
    """`sse`: each message is one `data: {json}` event and a clean end adds `data: [DONE]`; a
    failure after the first message is an `event: error`. `ndjson`: one JSON line per message;
    a failure after the first aborts the connection."""


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    upstream: str
    match: RouteMatch = RouteMatch()
    fallbacks: tuple[Fallback, ...] = ()
    """Tried in order once the primary gives up; YAML entries are a name or {upstream, model}."""
    limits: tuple[str, ...] = ()
    """Names from limits.rate and limits.concurrency; charged rate limits first, then
    concurrency, each group in the order listed here."""
    timeouts: Timeouts = Timeouts()
    retry: RetryPolicy = RetryPolicy()
    buffer: BufferConfig = BufferConfig()
    keepalive: Seconds | None = None
    """Write `: keepalive` after this much upstream silence on a committed SSE stream."""
    framing: FramingConfig = FramingConfig()
    """What a frame of the response body is (see FramingConfig); `auto` by default."""
    websocket: WebSocketConfig | None = None
    """Accept WebSocket sessions on this route (see WebSocketConfig); absent: plain HTTP
    only."""
    websocket_upstream: WebSocketUpstream | None = None
    """Bridge this HTTP route's requests to a WebSocket upstream, answering in SSE (see
    WebSocketUpstream); absent: the upstream is spoken to in HTTP. Not with `websocket`."""
    hedge: HedgePolicy | None = None
    """Hedge a slow first token (see HedgePolicy); absent: tries run one after another."""
    resume: ResumePolicy | None = None
    """Resume a chat completion stream cut mid-answer (see ResumePolicy); absent: a stream
    that breaks after the commit point ends visibly, as always."""
    grpc: GrpcRouteConfig | None = None
    """Take gRPC calls on this route (see GrpcRouteConfig); absent: never a gRPC call."""
    grpc_bridge: GrpcBridgeConfig | None = None
    """Serve this HTTP route from a gRPC method (see GrpcBridgeConfig)."""
