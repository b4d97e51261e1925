"""The client-facing HTTP/1.1 parser: llhttp (httptools) with the gateway's limits and reasons.

llhttp refuses smuggling-prone framing (Content-Length with Transfer-Encoding, two lengths, an
unknown coding), bad chunk sizes, bare CR or LF and bad tokens. It bounds nothing, so this
does, as aiohttp's parser did: a request line or header field of at most `MAX_LINE` bytes and
at most `MAX_HEADERS` headers. Every refusal is a `ParseError` with a reason label
(`refusals.REASONS`) chosen by where in the message it happened.
"""

from __future__ import annotations

from collections.abc import Callable

import httptools

from gateway.protocols.http.request import ParsedRequest

MAX_LINE = 8190
MAX_HEADERS = 128
_VERSIONS = frozenset({"1.1", "1.0"})
_IN_HEADERS = ("header", "content-length", "transfer-encoding")
"""Words in llhttp's message for a fault found in the headers (a bad length, say)."""


class ParseError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Upgraded(Exception):
    """The request before `offset` upgrades the connection; the bytes after it are not HTTP."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


class RequestParser:
    """Feeds bytes to llhttp; hands each request to `on_head` as soon as its head is complete,
    and its body to `ParsedRequest.add_body` as it comes."""

    __slots__ = (
        "_parser",
        "_on_head",
        "_remote",
        "_body_limit",
        "_url",
        "_headers",
        "_phase",
        "request",
        "in_head",
    )

    def __init__(
        self, on_head: Callable[[ParsedRequest], None], remote: str, body_limit: int
    ) -> None:
        self._on_head, self._remote, self._body_limit = on_head, remote, body_limit
        self._parser = httptools.HttpRequestParser(self)
        self.request: ParsedRequest | None = None
        """The request whose body is being parsed, until it is complete."""
        self.in_head = False
        """True between a request's first byte and the end of its headers."""
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._phase = "bad_request_line"

    def feed(self, data: bytes) -> None:
        """Raises ParseError, or Upgraded once a request upgrades the connection."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as up:
            raise Upgraded(up.args[0]) from None
        except httptools.HttpParserInvalidMethodError as exc:
            raise ParseError("bad_method", str(exc)) from None
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ParseError):
                raise cause from None
            raise ParseError("other", str(exc)) from None
        except httptools.HttpParserError as exc:
            # The first header is only seen whole: llhttp's message says it had begun.
            said = str(exc).lower()
            phase = "bad_message" if any(w in said for w in _IN_HEADERS) else self._phase
            raise ParseError(phase, str(exc)) from None

    # -- llhttp's callbacks

    def on_message_begin(self) -> None:
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_LINE:
            raise ParseError("line_too_long", f"request target over {MAX_LINE} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools gathers a header that spans packets and calls this once, whole. A chunked
        # body's trailers come here too, bounded alike, and are dropped at the message's end.
        self._phase = "bad_message"
        if len(name) > MAX_LINE or len(value) > MAX_LINE:
            raise ParseError("line_too_long", f"a header field over {MAX_LINE} bytes")
        if len(self._headers) == MAX_HEADERS:
            raise ParseError("bad_message", f"more than {MAX_HEADERS} headers")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in _VERSIONS:  # llhttp takes HTTP/0.9 and HTTP/2.0 request lines
            raise ParseError("bad_request_line", f"HTTP/{version} is not HTTP/1.x")
        request = ParsedRequest(
            parser.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            version,
            self._headers,
            self._remote,
            parser.should_keep_alive(),
        )
        self.in_head = False
        self._reset()
        self._phase = "bad_message"  # from here on, the body's framing
        self.request = request
        self._on_head(request)

    def on_body(self, body: bytes) -> None:
        self.request.add_body(body, self._body_limit)

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        self._phase = "bad_request_line"
        if self._headers:  # a chunked body's trailers: dropped, not the next request's headers
            self._headers = []
        request.body_done()
