"""gRPC messages and statuses as bytes the engine can carry: the gRPC-Web body format.

A gRPC exchange is messages and, at its end, a status with trailing metadata. Through the
engine (its buffer, clock and framing) they pass as the frames of one body, each with the
5-byte head gRPC itself puts on a message (flag byte, big-endian length) -- the same head as
the engine's message envelopes (`engine/messages.py`), so `messages.scan` and `split` apply:

    0x00 | length | message bytes                  one message (never compressed here)
    0x80 | length | "grpc-status: 0\r\n..."         the end: status, message, trailers

The trailers frame is gRPC-Web's: an HTTP/1-style header block, `grpc-message`
percent-encoded and `-bin` values base64, as on the HTTP/2 wire. A request body (what a
retry replays) is the request messages as data frames.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from urllib.parse import quote, unquote

from gateway.engine import messages

DATA, TRAILERS = 0x00, 0x80
HEAD_SIZE = messages.HEAD_SIZE

Metadata = tuple[tuple[str, str | bytes], ...]


def data_frame(payload: bytes) -> bytes:
    return messages.envelope(DATA, payload)


def request_body(requests: Iterable[bytes]) -> bytes:
    return b"".join(messages.envelope(DATA, m) for m in requests)


def request_messages(body: bytes) -> list[bytes]:
    return [payload for kind, payload in messages.split(body) if kind == DATA]


def trailers_frame(code: int, details: str, metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    lines = [f"grpc-status: {code}"]
    if details:
        lines.append(f"grpc-message: {quote(details, safe=' !#$&()*+,/:;=?@[]~')}")
    for key, value in metadata:
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode()
        lines.append(f"{key}: {value}")
    return messages.envelope(TRAILERS, ("\r\n".join(lines) + "\r\n").encode())


def read_trailers(payload: bytes) -> tuple[int, str, Metadata]:
    """(code, details, trailing metadata) of a trailers frame's payload."""
    code, details, metadata = 2, "", []  # UNKNOWN unless a status is there
    for line in payload.decode("utf-8", "replace").split("\r\n"):
        key, sep, value = line.partition(": ")
        if not sep:
            continue
        if key == "grpc-status":
            code = int(value) if value.isdigit() else 2
        elif key == "grpc-message":
            details = unquote(value)
        elif key.endswith("-bin"):
            metadata.append((key, base64.b64decode(value)))
        else:
            metadata.append((key, value))
    return code, details, tuple(metadata)
