"""One client connection on the proxy listener: an asyncio `Protocol` over llhttp.

Bytes go to the parser as they arrive; each request whose head is complete is served by one
task (`HttpServer.handle`), one at a time, while its body keeps arriving. A client that goes
away cancels that task (the engine's disconnect); so does an EOF, as with aiohttp: a half-close
is not told from a close. Pipelined requests wait their turn; the bytes after them are held
unparsed (read on, so that a client gone is seen at once) up to `HOLD` bytes. Also:

- a request the parser refuses, or whose headers take longer than `server.header_timeout`, is
  answered with the gateway's JSON error, counted and logged (`refusals.py`), and the
  connection closes; one whose body breaks mid-read is answered 400 by the proxy at once;
- a head growing past twice `server.max_header_bytes` is refused (431) before it is whole;
- `server.idle_timeout` closes a connection with no request on it (before the first, too);
- a WebSocket upgrade is handed, with its bytes, to the WebSocket adapter's connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import NamedTuple

from gateway.protocols.http.parsing import ParseError, RequestParser, Upgraded
from gateway.protocols.http.request import ParsedRequest, malformed_body

HOLD = 64 * 1024


class Refused(NamedTuple):
    """A request refused before it was whole: answered in its turn, then the close."""

    reason: str
    detail: str


class HttpConnection(asyncio.Protocol):
    def __init__(self, listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.settings = listener.settings()
        """The server config when the connection opened (a reload applies to later ones)."""
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.parser: RequestParser | None = None
        self.queue: deque[ParsedRequest | Refused] = deque()
        self.current: ParsedRequest | None = None
        self.task: asyncio.Task | None = None
        self.idle_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._stopped = False
        """Nothing more is parsed: a refusal or a close is coming."""
        self._upgrade: list[bytes] | None = None
        """Once a request upgrades: the bytes after its head, for whoever takes it over."""
        self._held: list[bytes] | None = None
        """While a pipelined request waits its turn: the bytes that came after it."""
        self._held_size = 0
        self._writable: asyncio.Future | None = None
        self._paused = False

    @property
    def draining(self) -> bool:
        return self.listener.draining

    # -- asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if peer else ""
        self.parser = RequestParser(self._on_head, self.remote, self.settings.max_request_body)
        self.listener.connections.add(self)
        self.idle_since = self.loop.time()
        self._idle_timer = self.loop.call_at(
            self.idle_since + self.settings.idle_timeout, self._idle_check
        )

    def data_received(self, data: bytes) -> None:
        if self._upgrade is not None or self._held is not None:
            self._hold(data)
            return
        if self._stopped:
            return
        parser = self.parser
        try:
            parser.feed(data)
        except Upgraded as up:
            self._upgraded(data[up.offset:])
        except ParseError as exc:
            self._refuse_parse(exc)
        else:
            if parser.in_head:
                self._head_bytes += len(data)
                if self._head_bytes > 2 * self.settings.max_header_bytes:
                    self._refuse(Refused("headers_too_large", "the request head is too large"))
                elif self._head_timer is None:  # only a head split over packets is timed
                    self._head_timer = self.loop.call_later(
                        self.settings.header_timeout, self._head_late
                    )
        if parser.in_head or self.queue:  # not blank lines: they keep nothing open
            self.idle_since = None
        if self.queue and self.task is None:
            self._next()
        if self.queue and self.task is not None:
            self._held = []  # a pipelined request waits: so does the rest

    def _hold(self, data: bytes) -> None:
        (self._upgrade if self._upgrade is not None else self._held).append(data)
        self._held_size += len(data)
        if self._held_size > HOLD and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _release(self) -> None:
        """No request waits any more: read on, from the bytes held."""
        held, self._held, self._held_size = self._held, None, 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self.data_received(b"".join(held))  # also re-arms the head timer of a partial head

    def _on_head(self, request: ParsedRequest) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = 0
        self.queue.append(request)

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    async def writable(self) -> None:
        """Until the transport takes writes again (at once when it is not paused)."""
        if self._writable is not None:
            await self._writable
        if self.transport.is_closing():
            raise ConnectionResetError("the client went away")

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timers()
        self.listener.connections.discard(self)
        self.queue.clear()
        if self.current is not None:
            self.current.body_failed(ConnectionResetError("the client went away"))
        if self.task is not None:
            self.task.cancel()  # the engine's disconnect: every stage unwinds
        self.resume_writing()

    # -- serving, one request at a time

    def _next(self) -> None:
        item = self.queue.popleft()
        if isinstance(item, Refused):
            self._answer_refusal(item)
        elif item.upgrade:
            self._hand_over(item)
        else:
            self.current = item
            self.task = self.loop.create_task(self._serve(item))

    async def _serve(self, request: ParsedRequest) -> None:
        sink = None
        try:
            sink = await self.listener.handler(request, self)
        finally:
            self._served(request, sink)

    def _served(self, request: ParsedRequest, sink) -> None:
        self.task = self.current = None
        transport = self.transport
        if transport.is_closing():
            return
        if sink is None or not sink.complete:  # an answer cut short: only a close is left
            transport.abort()
        elif sink.close or not request.complete or self.draining:
            self._close_after_answer()
        else:
            if self.queue:
                self._next()
            if self.task is None:
                self.idle_since = self.loop.time()
            if self._held is not None and not self.queue and not self._stopped:
                self._release()

    def _close_after_answer(self) -> None:
        self._stopped = True
        self.queue.clear()
        self.transport.close()  # after the buffered answer is flushed

    def continue_if_expected(self, request: ParsedRequest) -> None:
        """`Expect: 100-continue`: the proxy is about to wait for the body, so ask for it."""
        if request.version == "1.1" and request.size == 0 and (
            request.headers.get("expect", "").lower() == "100-continue"
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- refusals

    def _refuse_parse(self, exc: ParseError) -> None:
        failing = self.parser.request
        if failing is not None and failing is self.current:  # its body is being read
            failing.body_failed(malformed_body(str(exc)))
            self._stopped = True
            return
        if failing is not None and failing in self.queue:
            self.queue.remove(failing)
        self._refuse(Refused(exc.reason, str(exc)))

    def _refuse(self, refused: Refused) -> None:
        self._stopped = True
        self.queue.append(refused)

    def _answer_refusal(self, refused: Refused) -> None:
        self.transport.write(self.listener.refusals.answer(self.remote, *refused, self.loop.time()))
        self._close_after_answer()

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.parser.in_head or self._stopped or self._held is not None:
            return  # (a head held unparsed is timed again once it is read)
        self._refuse(Refused("header_timeout", "no complete request headers in time"))
        if self.task is None:
            self._next()

    # -- timers

    def _idle_check(self) -> None:
        """One timer per connection, moved along rather than made per request."""
        self._idle_timer = None
        if self.transport.is_closing():
            return
        timeout, now = self.settings.idle_timeout, self.loop.time()
        if self.idle_since is not None and now >= self.idle_since + timeout:
            self.transport.close()
            return
        due = (self.idle_since if self.idle_since is not None else now) + timeout
        self._idle_timer = self.loop.call_at(due, self._idle_check)

    def _stop_timers(self) -> None:
        for timer in (self._idle_timer, self._head_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._head_timer = None

    def close_if_idle(self) -> None:
        """For a drain: a connection between requests closes now; a busy one after its answer."""
        if self.task is None and not self.queue and not self.parser.in_head:
            self.transport.close()

    # -- upgrades

    def _upgraded(self, rest: bytes) -> None:
        request = self.queue[-1] if self.queue else None
        if request is None or isinstance(request, Refused):
            self._refuse(Refused("bad_message", "an upgrade without a request"))
        elif request.headers.get("upgrade", "").lower() == "websocket":
            request.upgrade = True
            self._upgrade = [rest]
        else:  # another protocol (h2c, say): ignored, as RFC 9110 7.8 allows
            self.parser = RequestParser(
                self._on_head, self.remote, self.settings.max_request_body
            )
            if rest:
                self.data_received(rest)

    def _hand_over(self, request: ParsedRequest) -> None:
        transport, rest = self.transport, b"".join(self._upgrade or ())
        self._stop_timers()
        self.listener.connections.discard(self)
        self._stopped = True
        if self._paused:
            self._paused = False
            transport.resume_reading()
        self.listener.upgrade(transport, request, rest)
