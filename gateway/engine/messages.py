"""A body of messages: how a message-based protocol (WebSocket) passes through the engine.

The engine moves bytes and cuts them into frames; a protocol whose unit is a message with a
type (text, binary) and an end (a close with a code and a reason) hands it over as one
envelope per message, so the relay, the clock and the buffer work on it unchanged:

    kind (1 byte: TEXT, BINARY or CLOSE, the WebSocket opcodes) | length (4 bytes, big-endian)
    | payload (a CLOSE payload is a 2-byte code and a UTF-8 reason, as on the wire)

An envelope is written whole by the adapter that reads it and read whole by the one that
writes it; `scan` finds where the last whole one ends.
"""

from __future__ import annotations

import struct

from gateway.errors import GatewayError, Overloaded, RateLimited

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8
_HEAD = struct.Struct(">BI")
HEAD_SIZE = _HEAD.size

NORMAL, GOING_AWAY, TOO_BIG, INTERNAL_ERROR, TRY_AGAIN_LATER = 1000, 1001, 1009, 1011, 1013
_MAX_REASON = 123
"""A close frame's payload is at most 125 bytes: the code and this much reason."""


def envelope(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(kind, len(payload)) + payload


def close_envelope(code: int, reason: str) -> bytes:
    return envelope(CLOSE, struct.pack(">H", code) + _clip(reason))


def close_of(payload: bytes) -> tuple[int, str]:
    """A CLOSE envelope's (code, reason); a close without a code is a normal one."""
    if len(payload) < 2:
        return NORMAL, ""
    return struct.unpack(">H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


def scan(data: bytes) -> tuple[int, int]:
    """(where the last whole envelope in `data` ends, how many whole envelopes precede it)."""
    at, count, size = 0, 0, len(data)
    while size - at >= HEAD_SIZE:
        _, length = _HEAD.unpack_from(data, at)
        end = at + HEAD_SIZE + length
        if end > size:
            break
        at, count = end, count + 1
    return at, count


def split(data: bytes):
    """Each whole envelope in `data` as (kind, payload)."""
    at, size = 0, len(data)
    while size - at >= HEAD_SIZE:
        kind, length = _HEAD.unpack_from(data, at)
        start = at + HEAD_SIZE
        yield kind, data[start : start + length]
        at = start + length


def closed_on_purpose(close: tuple[int, str] | None) -> bool:
    """Whether a session's client ended it with a close of its own (normal, going away, or
    an application's code): the session is complete, not a client gone. None: no close."""
    if close is None:
        return False
    code = close[0]
    return code in (NORMAL, GOING_AWAY) or 3000 <= code <= 4999


def last_data(data: bytes, end: int) -> bytes | None:
    """The payload of the last text or binary envelope in `data[:end]` (whole envelopes)."""
    found = None
    for kind, payload in split(data[:end]):
        if kind != CLOSE:
            found = payload
    return found


def error_code(err: GatewayError) -> int:
    """How a session that fails once its client is connected ends: never a clean 1000.
    Overload asks the client to come back later (1013); an idle session is going away
    (1001); anything else is the server's error (1011)."""
    if isinstance(err, Overloaded | RateLimited):
        return TRY_AGAIN_LATER
    if err.condition == "idle_timeout":
        return GOING_AWAY
    return INTERNAL_ERROR


def error_reason(err: GatewayError) -> str:
    return f"{err.condition}: {err.message}"


def error_close(err: GatewayError) -> bytes:
    """The close envelope that ends a session failing after its commit point."""
    return close_envelope(error_code(err), error_reason(err))


def _clip(reason: str) -> bytes:
    raw = reason.encode()
    if len(raw) <= _MAX_REASON:
        return raw
    return raw[:_MAX_REASON].decode("utf-8", "ignore").encode()  # never cut inside a character
