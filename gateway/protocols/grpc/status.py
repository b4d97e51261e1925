"""gRPC statuses at the adapter's edges: the gateway's errors as statuses, the upstream's
statuses as the engine's conditions, and telling a status a server sent from one the client
library made up because the connection broke."""

from __future__ import annotations

import grpc
from grpc import aio

from gateway.config.grpc_status import http_status_of, name_of
from gateway.errors import GatewayError

BY_CODE = {status.value[0]: status for status in grpc.StatusCode}

_FOR_HTTP_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,  # no route: nothing here serves that method
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""A refusal before the commit point, by the HTTP status the gateway would have answered."""

_BROKEN_DETAILS = (
    "Stream removed",
    "Socket closed",
    "Connection reset",
    "Broken pipe",
    "failed to connect",
    "Received RST_STREAM",
    "GOAWAY",
    "Received http2 header with status",
)
"""How grpc-core words a status it made up because the HTTP/2 stream or connection broke."""


def refusal_code(err: GatewayError) -> grpc.StatusCode:
    return _FOR_HTTP_STATUS.get(err.status, grpc.StatusCode.UNKNOWN)


def failure_code(err: GatewayError) -> int:
    """How a call ends that failed after its first message: never OK. A timeout (chunk_gap,
    total) is DEADLINE_EXCEEDED; anything else (a cut upstream, a slow client, shutdown)
    UNAVAILABLE, the status a client may retry."""
    status = (
        grpc.StatusCode.DEADLINE_EXCEEDED
        if err.outcome == "timeout"
        else grpc.StatusCode.UNAVAILABLE
    )
    return status.value[0]


def code_of(status: grpc.StatusCode) -> int:
    return status.value[0]


def conditions_of(code: int) -> tuple[str, ...]:
    """The names an upstream's status is matched by in `retry.on`, besides its HTTP status."""
    return (name_of(code),)


def http_status(code: int) -> int:
    return http_status_of(code)


def transport_failure(exc: aio.AioRpcError) -> bool:
    """Whether the status was made up by the client library because the exchange broke (the
    condition `reset`), rather than sent by the upstream (relayed as its answer)."""
    if exc.code() not in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    ):
        return False
    if exc.trailing_metadata():
        return False
    details = exc.details() or ""
    return any(phrase in details for phrase in _BROKEN_DETAILS)
