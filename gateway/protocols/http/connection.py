"""The client-facing HTTP/1.1 connection: aiohttp's protocol, with the gateway's rules at its edge.

aiohttp's `RequestHandler` is kept whole; this subclass changes what happens *before* a request
reaches `Proxy.handle`, where the proxy cannot see it:

- a request the HTTP parser refuses (smuggling-prone framing, bad chunk sizes, bare CR/LF,
  oversized lines, too many headers, bad tokens) gets the gateway's JSON error with an
  `x-request-id`, an `HTTP/1.1` status line and a fixed message (never the offending bytes);
  it is counted in `streamgate_bad_requests_total{reason}` and logged in one line, at most
  `LOG_BURST` lines at once and `LOG_PER_S` a second after that, so a flood cannot flood the log;
- `server.header_timeout` bounds the time from a request's first byte to the end of its headers
  (408, then close); `server.idle_timeout` closes connections with no request on them (aiohttp's
  keep-alive timer, which also runs before the first request).

The body's own bound (`server.body_timeout`) lives with the body read in `proxy.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
    PayloadEncodingError,
)
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import ERROR, RequestHandler, _ErrInfo

from gateway.config.model import ServerConfig
from gateway.errors import BadRequest, GatewayError, InternalError, RequestTimeout
from gateway.observe.metrics import Metrics
from gateway.protocols.http.errors import error_response

log = logging.getLogger("streamgate")

LOG_BURST = 10
LOG_PER_S = 1.0


class HeaderTimeout(Exception):
    """The request's headers did not arrive within `server.header_timeout`."""


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
    "other": "the request could not be processed",
}
REASONS = tuple(_MESSAGES)

_REASON_OF = {  # looked up along the exception's MRO, most specific first
    LineTooLong: "line_too_long",
    InvalidHeader: "invalid_header",
    BadHttpMethod: "bad_method",
    BadStatusLine: "bad_request_line",
    InvalidURLError: "bad_request_line",
    PayloadEncodingError: "bad_body_framing",
    BadHttpMessage: "bad_message",
    HttpProcessingError: "bad_message",
    HeaderTimeout: "header_timeout",
}

# The parser's stand-in message for a request it refused says HTTP/1.0; answer in 1.1.
_ERROR_11 = ERROR._replace(version=HttpVersion11)


def reason_of(exc: BaseException | None) -> str:
    for cls in type(exc).__mro__:
        reason = _REASON_OF.get(cls)
        if reason is not None:
            return reason
    return "other"


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


class GatewayServer(web.Server):
    """`web.Server` whose connections are `GatewayConnection`s, configured per connection from
    the current config (a reload applies to connections opened after it)."""

    def __init__(
        self,
        handler,
        settings: Callable[[], ServerConfig],
        metrics: Metrics,
        **kwargs,
    ) -> None:
        super().__init__(handler, request_factory=self._request, **kwargs)
        self._settings = settings
        self.metrics = metrics
        self.log_throttle = LogThrottle()

    def __call__(self) -> RequestHandler:
        settings = self._settings()
        return GatewayConnection(
            self, settings, loop=self._loop, keepalive_timeout=settings.idle_timeout, **self._kwargs
        )

    def _request(self, message, payload, protocol, writer, task) -> web.BaseRequest:
        if message is ERROR:
            message = _ERROR_11
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop)

    def refused(self, remote: str | None, reason: str, exc: BaseException | None, status: int):
        """Count and (rate-limited) log one request refused before the proxy saw it."""
        self.metrics.child(self.metrics.bad_requests, reason).inc()
        throttle = self.log_throttle
        if not throttle.allow(self._loop.time()):
            return
        held, throttle.suppressed = throttle.suppressed, 0
        detail = str(getattr(exc, "message", exc) or "").strip().split("\n", 1)[0][:120]
        log.warning(
            "refused a request from %s with %d: %s (%r)%s",
            remote or "?",
            status,
            reason,
            detail,
            f"; {held} more not logged" if held else "",
        )


class GatewayConnection(RequestHandler):
    def __init__(self, manager: GatewayServer, settings: ServerConfig, **kwargs) -> None:
        super().__init__(manager, **kwargs)
        self._gateway_server = manager
        self._header_timeout = settings.header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_expired = False

    # -- header timeout

    def data_received(self, data: bytes) -> None:
        if self._header_expired:
            return  # the 408 is queued; whatever else comes is not read
        awaiting_headers = self._awaiting_headers()
        super().data_received(data)
        if self._messages:  # headers complete (or refused): the clock stops
            self._stop_header_timer()
            self._fail_body_in_progress()
        elif awaiting_headers and self._header_timer is None:
            # Armed only when a packet leaves the headers unfinished: no timer per request.
            self._header_timer = self._loop.call_later(self._header_timeout, self._header_late)

    def _fail_body_in_progress(self) -> None:
        """The parser gave up in the middle of a body the proxy is reading (a bad chunk size
        sent late): it queues a refusal for later and leaves the body waiting forever. Hand the
        error to the body instead, so the proxy answers 400 now and the connection closes."""
        last = self._messages[-1][0]
        if self._current_request is None or not isinstance(last, _ErrInfo):
            return
        self._messages.pop()
        body = self._current_request.content
        body.set_exception(last.exc)
        body.feed_eof()  # nothing more is read from this connection

    def _awaiting_headers(self) -> bool:
        """No request queued or in the handler: bytes now are the next request's head."""
        return (
            not self._messages
            and self._current_request is None
            and (self._waiter is not None or self._request_count == 0)
        )

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_late(self) -> None:
        self._header_timer = None
        if self._messages or self.transport is None:
            return
        self._header_expired = True
        # Queued like a parser error, so it is answered by `handle_error` below.
        exc = HeaderTimeout(f"no complete request headers within {self._header_timeout:g}s")
        self._messages.append((_ErrInfo(status=408, exc=exc, message=str(exc)), EMPTY_PAYLOAD))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    # -- the answer to a request the parser refused

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # a response is half sent: only a close is left
            raise ConnectionError("response already started")
        if status >= 500:  # not the parser: an exception escaped Proxy.handle's own net
            log.error("internal error: %s: %.200s", type(exc).__name__, exc)
            err: GatewayError = InternalError(_MESSAGES["other"])
        else:
            reason = reason_of(exc)
            err = _refusal(reason)
            self._gateway_server.refused(request.remote, reason, exc, err.status)
        response = error_response(err, os.urandom(12).hex())
        response.force_close()
        return response


def _refusal(reason: str) -> GatewayError:
    if reason == "header_timeout":
        return RequestTimeout(_MESSAGES[reason])
    return MalformedRequest(_MESSAGES[reason])
