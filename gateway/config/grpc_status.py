"""gRPC status codes by name, and the HTTP status each corresponds to.

Config needs the names (`retry.on: [UNAVAILABLE]`); the gRPC adapter needs both directions.
The HTTP column is the standard mapping (google.rpc.Code, as grpc-gateway and Envoy use it),
so a gRPC answer can be judged by the same `retry.on` entries as an HTTP one: an upstream's
UNAVAILABLE matches both `UNAVAILABLE` and `503`.
"""

from __future__ import annotations

GRPC_STATUS = (
    ("OK", 200),
    ("CANCELLED", 499),
    ("UNKNOWN", 500),
    ("INVALID_ARGUMENT", 400),
    ("DEADLINE_EXCEEDED", 504),
    ("NOT_FOUND", 404),
    ("ALREADY_EXISTS", 409),
    ("PERMISSION_DENIED", 403),
    ("RESOURCE_EXHAUSTED", 429),
    ("FAILED_PRECONDITION", 400),
    ("ABORTED", 409),
    ("OUT_OF_RANGE", 400),
    ("UNIMPLEMENTED", 501),
    ("INTERNAL", 500),
    ("UNAVAILABLE", 503),
    ("DATA_LOSS", 500),
    ("UNAUTHENTICATED", 401),
)
"""(name, HTTP status), in code order: the code is the index."""

GRPC_STATUS_NAMES = tuple(name for name, _ in GRPC_STATUS)


def http_status_of(code: int) -> int:
    """The HTTP status a gRPC status code corresponds to (500 for a code past the table)."""
    return GRPC_STATUS[code][1] if 0 <= code < len(GRPC_STATUS) else 500


def name_of(code: int) -> str:
    return GRPC_STATUS[code][0] if 0 <= code < len(GRPC_STATUS) else f"CODE_{code}"
