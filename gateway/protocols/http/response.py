"""Response heads on the wire: the status line, the headers and the framing, in one bytes.

The framing is the gateway's: `Content-Length` for a whole body, `Transfer-Encoding: chunked`
for a stream to an HTTP/1.1 client (an HTTP/1.0 client reads a stream to the close), and
`Connection: close` when the connection ends after this answer (and `Connection: keep-alive`
when it does not, to an HTTP/1.0 client, which would assume a close otherwise).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus

from gateway.errors import GatewayError, error_body
from gateway.protocols.http.headers import SERVER

_STATUS_LINES = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus
}
_date = ["", 0]


def http_date() -> str:
    """Now, as `Date` says it; formatted at most once a second."""
    now = int(time.time())
    if now != _date[1]:
        _date[0], _date[1] = formatdate(now, usegmt=True), now
    return _date[0]


def response_head(
    status: int,
    headers: Iterable[tuple[str, str]],
    *,
    length: int | None,
    close: bool,
    chunked: bool = False,
    http10: bool = False,
) -> bytes:
    """`headers` must not carry framing (added here). `length` None and `chunked` False: the
    body runs to the close."""
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    if length is not None:
        lines.append(f"Content-Length: {length}\r\n")
    elif chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    if close:
        lines.append("Connection: close\r\n")
    elif http10:
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    status_line = _STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode()
    return status_line + "".join(lines).encode("latin-1", "surrogateescape")


def error_head_and_body(
    err: GatewayError,
    request_id: str,
    extra: Iterable[tuple[str, str]],
    close: bool,
    http10: bool = False,
) -> bytes:
    """SPEC's JSON error answer for a failure before the commit point, whole."""
    body = json.dumps(error_body(err, request_id)).encode()
    headers = [
        ("Content-Type", "application/json"), ("x-request-id", request_id), SERVER,
        ("Date", http_date()),
    ]
    if err.retry_after is not None:
        headers.append(("Retry-After", str(max(1, int(-(-err.retry_after // 1))))))
    headers.extend(extra)
    return response_head(err.status, headers, length=len(body), close=close, http10=http10) + body
