"""The load generator: OpenAI-style streaming requests over raw asyncio protocols.

A general HTTP client would cost more per chunk than the proxy under test, so this one does
only what the measurements need, with C-speed byte searches on each read:

- time to first chunk (TTFC): request written → the first read holding a content delta
  (`"delta":{"content"`). fake-llm sends a role-only delta with its headers; the gateway holds
  that back until content comes (its commit point), so the content delta is the fair mark;
- chunk gaps: the time between reads that bring events, once content has started;
- events: `data: ` occurrences; the end of a body: the chunked terminator or Content-Length.

Every connection is kept alive across streams, as an SDK client would. All times are
`time.monotonic()` (CLOCK_MONOTONIC, comparable with fake-llm's `/debug/stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CONTENT_MARK = b'"delta":{"content"'
_CHUNKED_END = b"\r\n0\r\n\r\n"
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)")
_monotonic = time.monotonic


def chat_request(host: str, port: int, fake: dict[str, Any], path: str = "/v1/chat/completions",
                 model: str = "bench", extra_headers: str = "") -> bytes:
    """The bytes of one streaming chat completion request with fake-llm knobs."""
    body = json.dumps({
        "model": model, "stream": True, "fake": fake,
        "messages": [{"role": "user", "content": "Tell me about load tests."}],
    }, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\n{extra_headers}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Tally:
    """What a workload measured, shared by all its connections."""

    __slots__ = ("ttfc", "gaps", "durations", "events", "reads", "ok", "errors", "statuses",
                 "t0", "t_end", "buckets", "bucket_s")

    def __init__(self, bucket_s: float = 0.25) -> None:
        self.ttfc = array("d")  # seconds, one per stream that produced content
        self.gaps = array("d")  # seconds between reads after the first content
        self.durations = array("d")  # request written → body complete
        self.events = 0
        self.reads = 0  # body reads (data_received calls); unpaced streams pack many events each
        self.ok = 0
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self.t0 = _monotonic()
        self.t_end = self.t0
        self.buckets: dict[int, int] = {}  # events received per `bucket_s` since t0
        self.bucket_s = bucket_s

    def rate_between(self, start_s: float, end_s: float) -> float | None:
        """Events per second in whole buckets between these offsets from t0."""
        first, last = int(start_s / self.bucket_s) + 1, int(end_s / self.bucket_s) - 1
        if last < first:
            return None
        events = sum(self.buckets.get(i, 0) for i in range(first, last + 1))
        return events / ((last - first + 1) * self.bucket_s)

    def throughput(self) -> tuple[list[float], list[float]]:
        """(seconds since t0, events per second) per bucket."""
        if not self.buckets:
            return [], []
        last = max(self.buckets)
        xs = [i * self.bucket_s for i in range(last + 1)]
        return xs, [self.buckets.get(i, 0) / self.bucket_s for i in range(last + 1)]


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that runs one streaming request at a time."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._done: asyncio.Future[bool] | None = None
        self._first: asyncio.Future[float] | None = None
        self._head = bytearray()
        self._in_body = False
        self._chunked = False
        self._keep_alive = True
        self._remaining = 0
        self._tail = b""
        self._sent_at = 0.0
        self._first_at = 0.0
        self._last_at = 0.0
        self._status = 0

    # -------------------------------------------------------------- driving it

    def start(self, request: bytes, *, notify_first: bool = False) -> asyncio.Future[bool]:
        """Write `request`; the future is done when its response body has ended."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._first = loop.create_future() if notify_first else None
        self._head.clear()
        self._in_body, self._tail, self._first_at = False, b"", 0.0
        assert self.transport is not None
        self._sent_at = _monotonic()
        self.transport.write(request)
        return self._done

    def first_content(self) -> asyncio.Future[float]:
        """Done at the first content delta (with its monotonic time); needs `notify_first`."""
        assert self._first is not None
        return self._first

    def close_now(self) -> float:
        """Send FIN at once (shutdown, not a deferred close); the monotonic time just before."""
        assert self.transport is not None
        self._done = self._first = None  # the exchange is abandoned, not failed
        return shut_down(self.transport)

    # -------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        now = _monotonic()
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self._parse_head(bytes(self._head[: end + 4]))
            data = bytes(self._head[end + 4 :])
            if not data and self._chunked:
                return
        self._body(data, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        done = self._done
        if done is not None and not done.done():
            if self._in_body and not self._chunked and self._remaining < 0:
                self._finish(_monotonic())  # a body delimited by the close
            else:
                self.tally.errors += 1
                done.set_exception(ConnectionError(f"connection lost: {exc}"))
        if self._first is not None and not self._first.done():
            self._first.set_exception(ConnectionError("connection lost before content"))

    # -------------------------------------------------------------- parsing

    def _parse_head(self, head: bytes) -> None:
        self._in_body = True
        self._status = int(head[9:12])
        lower = head.lower()
        self._chunked = b"\r\ntransfer-encoding: chunked" in lower
        self._keep_alive = b"\r\nconnection: close" not in lower
        match = _CONTENT_LENGTH.search(lower)
        self._remaining = int(match[1]) if match else (0 if self._chunked else -1)
        self._tail = b"\r\n"  # the head's end: an empty chunked body is just b"0\r\n\r\n"

    def _body(self, data: bytes, now: float) -> None:
        tally = self.tally
        tally.reads += 1
        events = data.count(b"data: ")
        if events:
            # Gaps are between reads that bring events: a read of framing alone (a proxy may
            # send a chunk's trailing CRLF in a segment of its own) is no chunk.
            if self._first_at:
                tally.gaps.append(now - self._last_at)
            elif CONTENT_MARK in data:
                self._first_at = now
                tally.ttfc.append(now - self._sent_at)
                if self._first is not None and not self._first.done():
                    self._first.set_result(now)
            self._last_at = now
            tally.events += events
            bucket = int((now - tally.t0) / tally.bucket_s)
            tally.buckets[bucket] = tally.buckets.get(bucket, 0) + events
        if self._chunked:
            tail = data if len(data) >= 7 else self._tail + data
            self._tail = tail[-7:]
            if tail.endswith(_CHUNKED_END):
                self._finish(now)
        elif self._remaining >= 0:
            self._remaining -= len(data)
            if self._remaining <= 0:
                self._finish(now)

    def _finish(self, now: float) -> None:
        tally = self.tally
        tally.durations.append(now - self._sent_at)
        tally.statuses[self._status] = tally.statuses.get(self._status, 0) + 1
        if self._status == 200:
            tally.ok += 1
        else:
            tally.errors += 1
        tally.t_end = now
        self._in_body = False
        if not self._keep_alive and self.transport is not None:
            self.transport.close()
            self.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_result(True)


def shut_down(transport: asyncio.Transport) -> float:
    """Send FIN on `transport` at once and close it; the monotonic time just before."""
    fd = transport.get_extra_info("socket").fileno()
    # uvloop's transport socket has no shutdown(); a duplicate fd reaches the same socket
    with socket.socket(fileno=os.dup(fd)) as sock:
        at = _monotonic()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    transport.close()
    return at


async def connect(host: str, port: int, tally: Tally) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(tally), host, port)
    return conn


@dataclass
class Workload:
    """`streams` streaming requests, `concurrency` at a time, each connection kept alive."""

    label: str
    host: str
    port: int
    request: bytes
    concurrency: int
    streams: int
    timeout_s: float
    stagger_s: float = 0.0
    """Spread the workers' first requests over this long (about one stream's length), so
    arrivals are even rather than one burst of `concurrency` requests in lock-step."""


class WorkloadTimeout(RuntimeError):
    pass


async def run(workload: Workload, on_stream: Callable[[], None] | None = None) -> Tally:
    """Run the workload to its count; raise WorkloadTimeout past its time bound."""
    tally = Tally()
    remaining = [workload.streams]
    conns: list[Connection] = []

    async def worker(i: int) -> None:
        conn: Connection | None = None
        if workload.stagger_s:
            await asyncio.sleep(i * workload.stagger_s / workload.concurrency)
        while remaining[0] > 0:
            remaining[0] -= 1
            if conn is None or conn.closed:
                conn = await connect(workload.host, workload.port, tally)
                conns.append(conn)
            try:
                await conn.start(workload.request)
            except ConnectionError:
                conn = None
            if on_stream is not None:
                on_stream()

    tally.t0 = _monotonic()
    try:
        async with asyncio.timeout(workload.timeout_s):
            await asyncio.gather(*(worker(i) for i in range(workload.concurrency)))
    except TimeoutError:
        raise WorkloadTimeout(
            f"{workload.label}: {workload.streams - remaining[0]} of {workload.streams} "
            f"streams started in {workload.timeout_s}s"
        ) from None
    finally:
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    return tally


async def hold_open(
    host: str, port: int, request: bytes, streams: int, timeout_s: float,
    on_open: Callable[[], None] | None = None, open_concurrency: int = 256,
) -> tuple[list[Connection], Tally]:
    """Open `streams` connections, each with a stream that has delivered its first content;
    the caller closes them. Opening is bounded to `open_concurrency` at a time."""
    tally = Tally()
    conns: list[Connection] = []
    gate = asyncio.Semaphore(open_concurrency)

    async def one() -> None:
        async with gate:
            conn = await connect(host, port, tally)
            conns.append(conn)
            conn.start(request, notify_first=True)
            await conn.first_content()
        if on_open is not None:
            on_open()

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(one() for _ in range(streams)))
    except BaseException:
        close_all(conns)
        raise
    return conns, tally


def close_all(conns: list[Connection]) -> None:
    for conn in conns:
        if conn.transport is not None:
            conn.close_now()
