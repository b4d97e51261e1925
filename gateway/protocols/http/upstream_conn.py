"""One HTTP/1.1 connection to an upstream: an asyncio Protocol with llhttp (httptools) parsing.

The response is parsed where it arrives, in `data_received`. Its body reaches the engine one of
two ways:

- pulled (`read`), up to the commit point: buffered here, reading paused past `HIGH_WATER`;
- pushed (`stream`), after it: the body bytes of each packet are handed to the engine's
  callback from inside `data_received`, in one piece however many HTTP chunks they were, with
  no future, queue or task wake-up per chunk. The callback answers True to hold: reading
  pauses (TCP backpressure reaches the backend) and `stream` returns, so the engine can drain
  the client before it streams on.

The connection serves one exchange at a time and is reused only after a complete response that
both sides keep alive (`reusable`); one abandoned mid-body is aborted, never reused. Whatever
ends an exchange early (the upstream closing, a reset, a malformed status line, header or
chunk-size line) is an `UpstreamBroken`, raised to whoever waits, so a cut body is never a
clean end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from multidict import CIMultiDict, CIMultiDictProxy

HIGH_WATER = 64 * 1024
"""Body bytes held for `read` before reading from the upstream pauses."""


class UpstreamBroken(ConnectionError):
    """The upstream dropped the exchange or answered with what is not HTTP/1.1. A ConnectionError
    (the engine's `reset`), and deliberately not a ConnectionResetError: the relay reads that
    one as the *client* gone."""


class _Unexpected(Exception):
    """Raised inside a parser callback to stop the parser at bytes no exchange asked for."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "transport", "lost", "idle_since", "status", "headers", "loop", "_parser", "_on_lost",
        "_waiter", "_raw", "_chunks", "_size", "_complete", "_keep", "_error", "_failed",
        "_deliver", "_pending", "_paused", "_busy", "_until_close", "_head_only",
    )  # fmt: skip

    def __init__(self, loop: asyncio.AbstractEventLoop, on_lost: Callable) -> None:
        self.loop = loop
        self._on_lost = on_lost
        self._parser = HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._busy = False
        self._waiter: asyncio.Future | None = None
        self._paused = False
        self._reset(False)

    def _reset(self, head_only: bool) -> None:
        self.status: int | None = None
        self.headers: CIMultiDictProxy[str] | None = None
        self._raw: list[tuple[str, str]] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        self._keep = False
        self._error: UpstreamBroken | None = None
        self._failed: Exception | None = None
        """What the engine's push callback raised (the client gone)."""
        self._deliver: Callable[[bytes], bool] | None = None
        self._pending = b""
        """Body bytes of the packet being parsed, pushed once it is (`data_received`)."""
        self._until_close = False
        self._head_only = head_only

    # ------------------------------------------------------------------ the engine's side

    def begin(self, request: bytes | list[bytes], head_only: bool) -> None:
        """Send one request; its answer is read with `head`, `read` and `stream`."""
        self._reset(head_only)
        self._busy = True
        if isinstance(request, list):
            self.transport.writelines(request)
        else:
            self.transport.write(request)

    async def head(self) -> None:
        """Until the status line and headers are in (raises UpstreamBroken). What breaks
        after them is for `read` or `stream` to raise, after the bytes before it."""
        while self.status is None:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The body bytes that arrived since the last call; b"" at the body's end."""
        while True:
            if self._chunks:
                return self._take()
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    async def stream(self, on_data: Callable[[bytes], bool]) -> bool:
        """Hand every body chunk to `on_data` as it arrives: True at the body's end, False as
        soon as `on_data` answers True (hold; nothing more is handed over until the next call)."""
        if self._chunks and on_data(self._take(resume=False)):
            self._pause()
            return False
        if self._error is not None:
            raise self._error
        if self._complete:
            return True
        self._deliver = on_data
        self._resume()
        try:
            ended = await self._wait()
        finally:
            self._deliver = None
        if ended is None:
            failed, self._failed = self._failed, None
            raise failed or self._error
        return ended

    @property
    def reusable(self) -> bool:
        """The exchange ended cleanly on a connection both sides keep alive."""
        return self._complete and self._keep and not self.lost and not self._chunks

    def finish(self) -> None:
        """The exchange is over and the connection goes idle: reading resumes, so that the
        upstream closing it is seen. (Its state is reset by the next `begin`.)"""
        self._busy = False
        self._resume()

    def abort(self) -> None:
        self._busy = False
        if self.transport is not None:
            self.transport.abort()

    def _wait(self) -> asyncio.Future:
        waiter = self._waiter = self.loop.create_future()
        return waiter

    def _wake(self, value: bool | None) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(value)

    def _take(self, resume: bool = True) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks, self._size = [], 0
        if resume:
            self._resume()
        return data

    def _pause(self) -> None:
        if not self._paused and not self.lost:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and not self.lost:
            self._paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ the transport's side

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            broken: Exception | None = exc
        else:
            broken = None
        pending = self._pending
        if pending:  # pushed: once per packet, however many HTTP chunks it held
            self._pending = b""
            try:
                hold = self._deliver(pending)
            except Exception as exc:  # the engine's verdict (the client gone): the task's now
                self._deliver, self._failed = None, exc
                self._pause()
                self._wake(None)
            else:
                if hold:
                    self._deliver = None
                    self._pause()
                    self._wake(False)
                elif self._complete:
                    self._wake(True)
        if broken is not None:  # after the good bytes before the bad ones
            self._broken(broken)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        if self._busy and not self._complete and self._error is None:
            if self._until_close and exc is None and self.status is not None:
                self._complete = True  # a body without length or chunks ends at the close
                self._wake(True)
            else:
                why = f": {exc}" if exc else ""
                self._error = UpstreamBroken(f"the upstream closed the connection{why}")
                self._wake(None)
        self._on_lost(self)

    def _broken(self, exc: Exception) -> None:
        self._keep = False
        if self._busy and not self._complete:
            cause = exc.__context__ if isinstance(exc.__context__, _Unexpected) else exc
            self._error = UpstreamBroken(f"the upstream's response is malformed: {cause}")
            self._wake(None)
        self.transport.abort()  # whatever the parser choked on, the connection is done

    # ------------------------------------------------------------------ the parser's callbacks

    def on_message_begin(self) -> None:
        if not self._busy or self._complete:
            raise _Unexpected("bytes after the response")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            self._raw = []
            return
        headers = CIMultiDict(self._raw)
        self._raw = []
        self.headers = CIMultiDictProxy(headers)
        self.status = status
        if self._head_only:  # no body follows, whatever the headers say
            self._complete = True
            self._wake(True)
            raise _Unexpected("the answer to HEAD is complete")  # the connection is not reused
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._until_close = (
            not chunked and "content-length" not in headers and status not in (204, 304)
        )
        self._wake(True)

    def on_body(self, body: bytes) -> None:
        if self._deliver is not None:  # pushed, once the packet is parsed (`data_received`)
            pending = self._pending
            self._pending = pending + body if pending else body
            return
        self._chunks.append(body)
        self._size += len(body)
        if self._size > HIGH_WATER:
            self._pause()
        if self._waiter is not None:
            self._wake(True)

    def on_message_complete(self) -> None:
        if self.status is None:
            return  # the end of an interim answer
        self._complete = True
        self._keep = self._parser.should_keep_alive()
        if not self._pending:  # else `data_received` wakes, once the engine has the bytes
            self._wake(True)
