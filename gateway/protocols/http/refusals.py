"""Requests refused before the engine sees them: the reason, the answer, the count, the log line.

A request the HTTP parser refuses (smuggling-prone framing, bad chunk sizes, bare CR/LF,
oversized lines, too many headers, bad tokens), or whose headers do not arrive within
`server.header_timeout`, gets the gateway's JSON error with an `x-request-id` and a fixed
message (never the offending bytes). It is counted in `streamgate_bad_requests_total{reason}`
and logged in one line, at most `LOG_BURST` lines at once and `LOG_PER_S` a second after that,
so that a flood cannot flood the log.
"""

from __future__ import annotations

import logging
import os

from gateway.errors import BadRequest, GatewayError, HeadersTooLarge, RequestTimeout
from gateway.observe.metrics import Metrics
from gateway.protocols.http.response import error_head_and_body

log = logging.getLogger("streamgate")

LOG_BURST = 10
LOG_PER_S = 1.0


class MalformedRequest(BadRequest):
    type = "malformed_request"
    condition = "malformed_request"


# reason label → what the client is told; the label set is closed (bounded cardinality).
_MESSAGES = {
    "line_too_long": "a request line or header line is too long",
    "invalid_header": "a request header is malformed",
    "bad_method": "the request method is not valid",
    "bad_request_line": "the request line is malformed",
    "bad_body_framing": "the request body's framing is malformed",
    "bad_message": "the request is malformed (framing headers, header count or syntax)",
    "header_timeout": "the request headers did not arrive in time",
    "headers_too_large": "the request headers are too large",
    "other": "the request could not be processed",
}
REASONS = tuple(_MESSAGES)


def refusal(reason: str) -> GatewayError:
    """What the client is told for `reason`."""
    if reason == "header_timeout":
        return RequestTimeout(_MESSAGES[reason])
    if reason == "headers_too_large":
        return HeadersTooLarge(_MESSAGES[reason])
    return MalformedRequest(_MESSAGES[reason])


class LogThrottle:
    """A token bucket for log lines: `burst` at once, then `per_s` a second; counts the rest."""

    def __init__(self, burst: int = LOG_BURST, per_s: float = LOG_PER_S) -> None:
        self._burst, self._per_s = burst, per_s
        self._tokens = float(burst)
        self._last = 0.0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._per_s)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return False
        self._tokens -= 1
        return True


class Refusals:
    """Counts and (rate-limited) logs the requests refused before the engine saw them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.throttle = LogThrottle()

    def answer(self, remote: str, reason: str, detail: str, now: float) -> bytes:
        """Count and log one refusal; the answer to write before the connection closes."""
        err = refusal(reason)
        self.record(remote, reason, detail, err.status, now)
        return error_head_and_body(err, os.urandom(12).hex(), (), close=True)

    def record(self, remote: str, reason: str, detail: str, status: int, now: float) -> None:
        self.metrics.child(self.metrics.bad_requests, reason).inc()
        throttle = self.throttle
        if not throttle.allow(now):
            return
        held, throttle.suppressed = throttle.suppressed, 0
        log.warning(
            "refused a request from %s with %d: %s (%r)%s",
            remote or "?",
            status,
            reason,
            detail.strip().split("\n", 1)[0][:120],
            f"; {held} more not logged" if held else "",
        )
