"""Metadata at the two boundaries, as headers are for HTTP: what describes one hop (the HTTP/2
connection, the deadline, the encodings, the status) is dropped both ways; everything else
passes. Keys are lower case on the gRPC wire; `-bin` values are bytes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gateway.protocols.grpc.wire import Metadata

PER_HOP = frozenset(
    {
        "accept",
        "accept-encoding",
        "connection",
        "content-length",
        "content-type",
        "grpc-accept-encoding",
        "grpc-encoding",
        "grpc-message",
        "grpc-status",
        "grpc-timeout",
        "host",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
    }
)
"""Never relayed: set per hop by grpc-core, or by the gateway (the deadline)."""


def as_headers(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str | bytes]:
    """A call's metadata as the engine's headers (lower-case keys; a repeated key's values
    joined by ", ", as HTTP joins them)."""
    headers: dict[str, str | bytes] = {}
    for key, value in metadata:
        seen = headers.get(key)
        if seen is None or isinstance(value, bytes) or isinstance(seen, bytes):
            headers[key] = value
        else:
            headers[key] = f"{seen}, {value}"
    return headers


def forwarded(
    headers: Mapping[str, str | bytes], configured: Iterable[tuple[str, str]]
) -> Metadata:
    """What goes upstream: the request's headers less the per-hop ones, the upstream's
    configured metadata replacing entries of the same key."""
    out = {}
    for key, value in headers.items():
        lower = key.lower()
        if lower in PER_HOP or lower.startswith(":"):
            continue
        if isinstance(value, str) and (lower.endswith("-bin") or not _sendable(value)):
            continue  # an HTTP header that gRPC metadata cannot carry as it is
        out[lower] = value
    for key, value in configured:
        out[key.lower()] = value
    return tuple(out.items())


def _sendable(value: str) -> bool:
    return value.isascii() and value.isprintable()


def to_client(metadata: Mapping[str, str | bytes] | Metadata, request_id: str) -> Metadata:
    """What goes back to the client (initial or trailing), with the request's id."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    kept = tuple(
        (k, v) for k, v in items if k not in PER_HOP and k != "x-request-id" and k[:1] != ":"
    )
    return (*kept, ("x-request-id", request_id))
