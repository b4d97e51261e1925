"""Framings: what a frame of a response body is, which frame commits, how a failure shows.

The engine never looks inside a body except through one of these. Each framing answers, for
one stream, three questions:

- `cut(data)`: where the last complete frame in `data` ends (0: none yet). Only whole frames
  are written to the client, so an error frame never lands inside another frame. The number
  of frames before the cut is left in `frames` (the `chunks` a stream counts).
- `commits(frames)`: do these complete frames carry something to say? The first that does is
  the commit point; frames before it (an SSE role-only delta, a Truss header) are held back,
  so a backend that sends them and then stalls can still be failed over.
- after the commit point, a failure is made visible by `error_frame` (a last frame the client
  understands, then a clean close) or, where it gives None, by aborting the connection so the
  client sees a cut body, never a clean end. `ended(tail)` judges the body's end: bytes left
  inside a frame, or a frame the framing requires that never came, are a truncation.

| framing | frame               | commits on                 | failure after commit     |
|---------|---------------------|----------------------------|--------------------------|
| sse     | an event            | first event with content   | `event: error`, close    |
| ndjson  | a line              | first line                 | abort                    |
| raw     | whatever arrives    | first bytes                | abort                    |
| unary   | the whole body      | a complete non-empty body  | abort                    |
| truss   | a Truss Chains tag  | first ITEM frame           | abort; truncation aborts |
| messages| a message envelope  | the first message          | a close envelope (1011)  |
| grpc    | a gRPC message      | the first message          | a trailers frame, not OK |

`messages` and `grpc` are not a route's choice: a protocol whose upstream answers in messages
names its framing on its response (`UpstreamResponse.framing`): WebSocket `Messages` (see
`messages.py`), gRPC `GrpcMessages` (in its adapter, `protocols/grpc/framing.py`).

A route names its framing (`framing:`) or leaves it to `auto`, which picks by the response's
content type and whether the request asked for a stream (`choose`).
"""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config.routes import FramingConfig
from gateway.engine import messages, sse, truss
from gateway.engine.answer_end import EndTest
from gateway.errors import GatewayError, UpstreamReset
from gateway.observe import usage


class Framing:
    """The base framing, `raw`: every read is one frame, and any byte commits."""

    name = "raw"
    streams = True
    """False for `unary`: the body is read whole before committing."""
    keepalive: bytes | None = None
    """A frame that says nothing, written after upstream silence (SSE comments)."""
    watches_usage = False
    """Whether frames may carry an OpenAI `usage` object to count tokens from."""
    answering = False
    """Whether, after the frames last cut, an answer is still in progress (a two-way session
    whose route says which message ends an answer): `chunk_gap` bounds the next silence
    rather than the session's `idle`."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames = 0

    def cut(self, data: bytes) -> int:
        self.frames = 1
        return len(data)

    def commits(self, frames: bytes) -> bool:
        return bool(frames)

    def commits_at_end(self, body: bytes) -> bool:
        """Whether a body that ended before committing had anything to say."""
        return self.commits(body)

    def error_frame(self, err: GatewayError, request_id: str) -> bytes | None:
        return None

    def usage(self, frames: bytes) -> tuple[int, int] | None:
        """(prompt, completion) tokens from the frames that mentioned `usage`."""
        return None

    def drop_usage_only(self, frames: bytes) -> tuple[bytes, int]:
        """`frames` without those that carry nothing but usage (what an OpenAI stream adds
        when asked for it), and how many were dropped."""
        return frames, 0

    def ended(self, tail: bytes) -> GatewayError | None:
        """Judge the body's end, `tail` being bytes after the last complete frame (relayed
        as sent when this returns None)."""
        return None


class Unary(Framing):
    """A whole answer: read to its end (bounded by `buffer.bytes`) before committing; a larger
    body is streamed on as raw bytes."""

    name = "unary"
    streams = False
    __slots__ = ()


class Ndjson(Framing):
    """Newline-delimited JSON (or JSON Lines): a frame is a line."""

    name = "ndjson"
    __slots__ = ()

    def cut(self, data: bytes) -> int:
        end = data.rfind(b"\n") + 1
        self.frames = data.count(b"\n", 0, end)
        return end


class Sse(Framing):
    """Server-sent events: a frame is an event. The separator (LF or CRLF pairs) is learnt
    from the stream itself."""

    name = "sse"
    keepalive = b": keepalive\n\n"
    watches_usage = True
    __slots__ = ("sep",)

    def __init__(self) -> None:
        super().__init__()
        self.sep = b""

    def cut(self, data: bytes) -> int:
        sep = self.sep
        if not sep:
            if not sse.has_separator(data):
                self.frames = 0
                return 0  # no event is whole yet; which separator it uses is still unknown
            sep = self.sep = sse.separator_of(data)
        end = data.rfind(sep)
        if end < 0:
            self.frames = 0
            return 0
        end += len(sep)
        # Most reads end on an event's end: count without the bounds, which cost more to parse.
        self.frames = data.count(sep) if end == len(data) else data.count(sep, 0, end)
        return end

    def commits(self, frames: bytes) -> bool:
        return sse.has_content(frames, self.sep or sse.LF_SEPARATOR)

    def commits_at_end(self, body: bytes) -> bool:
        sep = self.sep or sse.separator_of(body)
        # A body that ends without a final separator still ends its last event.
        return sse.has_content(body if body.endswith(sep) else body + sep, sep)

    def error_frame(self, err: GatewayError, request_id: str) -> bytes | None:
        return sse.error_event(err, request_id)

    def usage(self, frames: bytes) -> tuple[int, int] | None:
        return usage.from_sse(frames, self.sep)

    def drop_usage_only(self, frames: bytes) -> tuple[bytes, int]:
        return usage.drop_usage_only(frames, self.sep or sse.LF_SEPARATOR)


class Truss(Framing):
    """Baseten Truss Chains typed streams: 5-byte tags (kind, big-endian length) + payload.
    The header is held back like a role-only delta; the first ITEM commits."""

    name = "truss"
    __slots__ = ("require_footer", "seen")

    def __init__(self, require_footer: bool) -> None:
        super().__init__()
        self.require_footer = require_footer
        self.seen = truss.Seen()

    def cut(self, data: bytes) -> int:
        end, self.frames = truss.scan(data, self.seen)
        return end

    def commits(self, frames: bytes) -> bool:
        return self.seen.items > 0

    def commits_at_end(self, body: bytes) -> bool:
        self.cut(body)
        return self.seen.items > 0

    def ended(self, tail: bytes) -> GatewayError | None:
        if tail:
            return UpstreamReset(f"the Truss stream ended inside a frame ({len(tail)} bytes)")
        if self.require_footer and not self.seen.footer:
            return UpstreamReset("the Truss stream ended without its footer")
        return None


class Messages(Framing):
    """Message envelopes (`messages.py`): a frame is a message, and any message commits (the
    client was connected before, so that it could ask). A failure after the commit point ends
    with a close envelope the client's protocol shows as an error close. With `ends_answer`
    (the route's `answer_end`), each data message says whether an answer is in progress."""

    name = "messages"
    __slots__ = ("ends_answer", "answering")

    def __init__(self, ends_answer: EndTest | None = None) -> None:
        super().__init__()
        self.ends_answer = ends_answer
        self.answering = False

    def cut(self, data: bytes) -> int:
        end, self.frames = messages.scan(data)
        if self.ends_answer is not None and end:
            last = messages.last_data(data, end)
            if last is not None:
                self.answering = not self.ends_answer(last)
        return end

    def error_frame(self, err: GatewayError, request_id: str) -> bytes | None:
        return messages.error_close(err)

    def ended(self, tail: bytes) -> GatewayError | None:
        if tail:
            return UpstreamReset(f"the message stream ended inside a message ({len(tail)} bytes)")
        return None


NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/jsonlines"})


def choose(config: FramingConfig, headers: Mapping[str, str], stream: bool) -> Framing:
    """A fresh framing for one response: the route's, or by content type under `auto`."""
    kind = config.kind
    if kind == "auto":
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type == "text/event-stream":
            return Sse()
        if content_type in NDJSON_TYPES:
            return Ndjson()
        return Framing() if stream else Unary()
    return _BY_NAME[kind](config)


_BY_NAME = {
    "sse": lambda config: Sse(),
    "ndjson": lambda config: Ndjson(),
    "raw": lambda config: Framing(),
    "unary": lambda config: Unary(),
    "truss": lambda config: Truss(config.require_footer),
}
