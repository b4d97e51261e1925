"""One HTTP/1.1 request as the client-facing parser delivered it, and its body as it arrives.

The head is complete when this exists; the body comes in afterwards (`add_body`), bounded:
past `body_limit` bytes nothing more is kept, only counted, and the reader is told the body is
too large. Small pieces (a chunked body in tiny chunks: one bytes object each, out of llhttp)
are gathered into one bytearray, so that what is held stays about the size of the body.
`wait_body` is what the proxy awaits (within its own `body_timeout`).
"""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import BadRequest

_SMALL = 1024


class ParsedRequest:
    __slots__ = (
        "method",
        "raw_path",
        "version",
        "headers",
        "raw_headers",
        "head_size",
        "remote",
        "keep_alive",
        "upgrade",
        "parts",
        "size",
        "complete",
        "error",
        "_waiter",
    )

    def __init__(
        self,
        method: str,
        raw_path: str,
        version: str,
        raw_headers: list[tuple[bytes, bytes]],
        remote: str,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.version = version
        """"1.1" or "1.0": how the answer is framed."""
        self.raw_headers = raw_headers
        self.headers = CIMultiDictProxy(
            CIMultiDict([(n.decode("latin-1"), _text(v)) for n, v in raw_headers])
        )
        self.head_size = sum(len(n) + len(v) + 4 for n, v in raw_headers)
        """The header lines' bytes (the request line not counted), for `max_header_bytes`."""
        self.remote = remote
        self.keep_alive = keep_alive
        self.upgrade = False
        """True for a WebSocket upgrade: the connection is handed over, not answered here."""
        self.parts: list[bytes] = []
        self.size = 0
        self.complete = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    def add_body(self, data: bytes, limit: int) -> None:
        self.size += len(data)
        if self.size <= limit:
            parts = self.parts
            if not parts or len(data) >= _SMALL:
                parts.append(data)
            elif type(last := parts[-1]) is bytearray:
                last += data
            else:
                parts.append(bytearray(data))
        else:  # over: nothing more is kept, and the reader is told
            self.parts.clear()
            self._wake()

    def body_done(self) -> None:
        self.complete = True
        self._wake()

    def body_failed(self, exc: BaseException) -> None:
        """The body will not come: malformed framing, or the client left mid-body."""
        if not self.complete:
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_body(self, limit: int) -> bytes:
        """The whole body, once it is here; `limit` as `add_body` was given it."""
        while True:
            if self.error is not None:
                raise self.error
            if self.size > limit:
                return b""  # the caller compares `size` to the limit
            if self.complete:
                return b"".join(self.parts)
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def malformed_body(detail: str) -> BadRequest:
    return BadRequest(f"malformed request body ({detail})")
