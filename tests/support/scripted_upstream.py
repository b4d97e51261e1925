"""A scriptable HTTP/1.1 upstream for the gateway's tests.

Every byte and every failure of every response is the test's choice, which is why this is a
raw asyncio Protocol and not aiohttp's server: aiohttp would refuse to send a malformed
chunk-size line, cannot reset a connection before the status line, and closes connections on
its own terms. The server records what it received and, from the transport callbacks, the
moment the peer closed each connection, even while a response is sleeping or stalled.

    async with ScriptedUpstream() as up:
        up.script(
            Respond(status=429, headers={"Retry-After": "1"}, body=error_body("slow down")),
            Respond(sse=True, chunks=[role_delta(), Sleep(0.05), content("hi "), done()]),
        )
        ...  # point the gateway at up.url
        first, second = await up.wait_for_requests(2)
        await up.wait_connections_closed()

One scripted response is used per incoming request, in arrival order; `default` answers
once the script is used up. A script entry may also be a callable taking the
`RecordedRequest` and returning (or awaiting to) a response, to branch on the request.
"""

from __future__ import annotations

import asyncio
import inspect
import json as jsonlib
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NamedTuple

from multidict import CIMultiDict

_MAX_LINE = 64 * 1024
_LINGER_RESET = struct.pack("ii", 1, 0)


class _PeerGone(Exception):
    """The connection went away; the response in flight ends quietly."""


class BadRequest(Exception):
    """The peer sent something that is not HTTP/1.1; recorded in `ScriptedUpstream.errors`."""


# ---------------------------------------------------------------------------- recording


@dataclass
class RecordedRequest:
    method: str
    path: str  # the request target exactly as sent, query string included
    version: str
    headers: CIMultiDict[str]
    body: bytes
    connection_id: int
    received_at: float  # time.monotonic() when the whole request had arrived
    response_bytes: int = 0  # bytes of the response handed to the socket so far (live)

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in self.headers.get("Connection", "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


class ClosedEvent(NamedTuple):
    """The peer closed (EOF) or reset a connection; closes the server made are not recorded."""

    connection_id: int
    at: float  # time.monotonic() when the server saw it
    mid_response: bool  # a request had arrived and its response was not finished


# ---------------------------------------------------------------------------- actions
# Items of `Respond.chunks`. Each plays itself on the connection and says whether the
# response goes on.


class _Action:
    async def play(self, conn: _Connection) -> bool:
        raise NotImplementedError


@dataclass(frozen=True)
class Raw(_Action):
    """Bytes written as they are, with no chunk framing (malformed framing, odd bodies)."""

    data: bytes

    async def play(self, conn: _Connection) -> bool:
        await conn.write(self.data)
        return True


@dataclass(frozen=True)
class Sleep(_Action):
    """Pause; the response ends at once if the peer closes meanwhile."""

    seconds: float

    async def play(self, conn: _Connection) -> bool:
        await conn.sleep(self.seconds)
        return True


@dataclass(frozen=True)
class WaitFor(_Action):
    """Pause until the test sets `event`: lock-step control with no timing guesses."""

    event: asyncio.Event

    async def play(self, conn: _Connection) -> bool:
        await conn.until(self.event.wait())
        return True


@dataclass(frozen=True)
class Stall(_Action):
    """Send nothing more; keep the connection open until the peer closes it."""

    async def play(self, conn: _Connection) -> bool:
        await conn.gone.wait()
        return False


@dataclass(frozen=True)
class Reset(_Action):
    """Abort with a real TCP RST (SO_LINGER 0, then close)."""

    async def play(self, conn: _Connection) -> bool:
        conn.reset()
        return False


@dataclass(frozen=True)
class Close(_Action):
    """Close cleanly (FIN) here: the body is truncated, a chunked one lacks its 0-chunk."""

    async def play(self, conn: _Connection) -> bool:
        conn.close()
        return False


def _actions(items: Iterable[bytes | str | _Action], chunked: bool) -> tuple[_Action, ...]:
    """Turn body items into actions once, framing them for the response's mode."""
    actions: list[_Action] = []
    for item in items:
        if isinstance(item, _Action):
            actions.append(item)
            continue
        if not isinstance(item, bytes | bytearray | str):
            raise TypeError(f"a body item is bytes, str or an action, not {item!r}")
        data = item.encode() if isinstance(item, str) else bytes(item)
        if chunked and data:  # an empty chunk would end the body: skip it
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if data:
            actions.append(Raw(data))
    return tuple(actions)


# ---------------------------------------------------------------------------- responses


class _Response:
    async def play(self, conn: _Connection) -> bool:
        """Answer one request; True when the connection may serve another."""
        raise NotImplementedError


Script = _Response | Callable[["RecordedRequest"], "_Response | Awaitable[_Response]"]


@dataclass
class Respond(_Response):
    """A response with a status line and headers, then `chunks` played in order.

    Framing: chunked by default; `content_length=True` declares the length of the byte items,
    an int declares that number whatever is sent; `body=` is one item with Content-Length;
    `chunked=False` without a length delimits the body by closing the connection.
    Headers are sent verbatim, hop-by-hop ones included; a framing header you pass replaces
    the one that would be added. `delay` waits before the status line.
    """

    status: int = 200
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = ()
    chunks: list[bytes | str | _Action] = field(default_factory=list)
    body: bytes | None = None
    json: Any = None
    sse: bool = False
    chunked: bool | None = None
    content_length: bool | int = False
    reason: str | None = None
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.json is not None:
            self.body = jsonlib.dumps(self.json).encode()
        if self.body is not None:
            if self.chunks:
                raise ValueError("give body or chunks, not both")
            self.chunks = [self.body]
            if self.content_length is False:
                self.content_length = True
        if self.chunked is None:
            self.chunked = self.content_length is False
        if self.chunked and self.content_length is not False:
            raise ValueError("a response is chunked or has a Content-Length, not both")
        self._actions = _actions(self.chunks, self.chunked)
        headers = list(self.headers.items() if isinstance(self.headers, Mapping) else self.headers)
        framed = self.chunked or self.content_length is not False
        closes = any(k.lower() == "connection" and "close" in v.lower() for k, v in headers)
        self._reusable = framed and not closes
        self._head = self._render_head(headers)

    def _render_head(self, headers: list[tuple[str, str]]) -> bytes:
        names = {name.lower() for name, _ in headers}
        if self.sse and "content-type" not in names:
            headers.append(("Content-Type", "text/event-stream"))
        elif self.json is not None and "content-type" not in names:
            headers.append(("Content-Type", "application/json"))
        if self.chunked and "transfer-encoding" not in names:
            headers.append(("Transfer-Encoding", "chunked"))
        if self.content_length is not False and "content-length" not in names:
            headers.append(("Content-Length", str(self._length())))
        status_line = f"HTTP/1.1 {self.status} {self.reason or _phrase(self.status)}"
        lines = [status_line] + [f"{name}: {value}" for name, value in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _length(self) -> int:
        if self.content_length is True:
            return sum(len(a.data) for a in self._actions if isinstance(a, Raw))
        return int(self.content_length)

    async def play(self, conn: _Connection) -> bool:
        await conn.sleep(self.delay)
        await conn.write(self._head)
        for action in self._actions:
            if not await action.play(conn):
                return False
        if self.chunked:
            await conn.write(b"0\r\n\r\n")
        return self._reusable


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class RawResponse(_Response):
    """Bytes and actions with no status line or framing added; the connection closes after."""

    def __init__(self, *chunks: bytes | str | _Action) -> None:
        self._actions = _actions(chunks, chunked=False)

    async def play(self, conn: _Connection) -> bool:
        for action in self._actions:
            if not await action.play(conn):
                break
        return False


@dataclass(frozen=True)
class ResetBeforeHeaders(_Response):
    """Read the request, then send a TCP RST instead of a response."""

    delay: float = 0.0

    async def play(self, conn: _Connection) -> bool:
        await conn.sleep(self.delay)
        conn.reset()
        return False


@dataclass(frozen=True)
class CloseBeforeHeaders(_Response):
    """Read the request, then close cleanly without a byte of response."""

    delay: float = 0.0

    async def play(self, conn: _Connection) -> bool:
        await conn.sleep(self.delay)
        conn.close()
        return False


@dataclass(frozen=True)
class NoResponse(_Response):
    """Read the request and never answer; keep the connection until the peer closes it."""

    async def play(self, conn: _Connection) -> bool:
        await conn.gone.wait()
        return False


# ---------------------------------------------------------------------------- connection


class _Connection(asyncio.Protocol):
    """One accepted TCP connection: a request reader over a byte buffer, and the writer."""

    def __init__(self, upstream: ScriptedUpstream, connection_id: int) -> None:
        self._up = upstream
        self.id = connection_id
        self.transport: asyncio.Transport | None = None
        self.request: RecordedRequest | None = None
        self.mid_response = False
        self.gone = asyncio.Event()  # the connection is closed or closing, by either side
        self._buffer = bytearray()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:  # uvloop's is no subclass
        self.transport = transport
        # With no write buffer to speak of, awaiting a write means the kernel has the bytes:
        # each item reaches the peer as its own TCP write, and a peer that stops reading
        # stops the script (real backpressure).
        transport.set_write_buffer_limits(high=0)
        self._up._connection_made(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._readable.set()

    def eof_received(self) -> bool:
        self._peer_left()
        return False  # HTTP clients do not half-close: let the transport close now

    def connection_lost(self, exc: Exception | None) -> None:
        self._peer_left()
        self._writable.set()
        self._up._connection_lost(self)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _peer_left(self) -> None:
        if self.gone.is_set():
            return
        self.gone.set()
        self._readable.set()
        self._up._peer_closed(ClosedEvent(self.id, time.monotonic(), self.mid_response))

    # -- what responses and actions use

    async def write(self, data: bytes) -> None:
        if self.gone.is_set():
            raise _PeerGone
        self.transport.write(data)
        self.request.response_bytes += len(data)
        await self._writable.wait()
        if self.gone.is_set():
            raise _PeerGone

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await self.until(asyncio.sleep(seconds))

    async def until(self, awaitable: Awaitable[Any]) -> None:
        """Await `awaitable`, but end the response the moment the connection goes away."""
        waits = (asyncio.ensure_future(awaitable), asyncio.ensure_future(self.gone.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
            await asyncio.gather(*waits, return_exceptions=True)  # leave no task behind
        if self.gone.is_set():
            raise _PeerGone

    # Setting `gone` first is what keeps closes made here out of `closed_events`. A peer that
    # has already left leaves nothing to close or reset.

    def close(self) -> None:
        if not self.gone.is_set():
            self.gone.set()
            self.transport.close()

    def reset(self) -> None:
        if not self.gone.is_set():
            self.gone.set()
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            self.transport.abort()

    def abort(self) -> None:
        self.gone.set()
        self.transport.abort()

    # -- serving

    async def serve(self) -> None:
        try:
            while True:
                self.request = await self._read_request()
                self.mid_response = True
                response = await self._up._next_response(self.request)
                reusable = await response.play(self)
                self.mid_response = False
                if not (reusable and self.request.keep_alive):
                    break
        except _PeerGone:
            pass
        except BadRequest as exc:
            self._up.errors.append(exc)
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        except Exception as exc:  # a broken script or handler: make the test fail visibly
            self._up.errors.append(exc)
        finally:
            self.close()

    async def _read_request(self) -> RecordedRequest:
        head = await self._read_until(b"\r\n\r\n")
        start, *lines = head[:-4].decode("latin-1").split("\r\n")
        parts = start.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise BadRequest(f"bad request line {start!r}")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise BadRequest(f"bad header line {line!r}")
            headers.add(name, value.strip())
        if headers.get("Expect", "").lower() == "100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await self._read_body(headers)
        method, path, version = parts
        return RecordedRequest(method, path, version, headers, body, self.id, time.monotonic())

    async def _read_body(self, headers: CIMultiDict[str]) -> bytes:
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            return await self._read_chunked()
        length = headers.get("Content-Length", "0")
        if not length.isdigit():
            raise BadRequest(f"bad Content-Length {length!r}")
        return await self._read_exactly(int(length))

    async def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size_line = await self._read_until(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise BadRequest(f"bad chunk size line {size_line!r}") from None
            if size == 0:
                break
            chunk = await self._read_exactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise BadRequest("chunk data not followed by CRLF")
            parts.append(chunk[:-2])
        while await self._read_until(b"\r\n") != b"\r\n":  # trailers, ignored
            pass
        return b"".join(parts)

    async def _read_until(self, separator: bytes) -> bytes:
        while (end := self._buffer.find(separator)) < 0:
            if len(self._buffer) > _MAX_LINE:
                raise BadRequest("request head or chunk line too long")
            await self._more()
        return self._take(end + len(separator))

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._more()
        return self._take(n)

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def _more(self) -> None:
        if self.gone.is_set():
            raise _PeerGone
        self._readable.clear()
        await self._readable.wait()


# ---------------------------------------------------------------------------- server


def _exhausted() -> Respond:
    body = error_body("scripted upstream: script exhausted", type="server_error")
    return Respond(status=500, headers={"Content-Type": "application/json"}, body=body)


class ScriptedUpstream:
    """A real TCP server on 127.0.0.1 (free port) answering requests from a script."""

    def __init__(self, *, raise_errors: bool = True) -> None:
        self.default: Script = _exhausted()
        self.requests: list[RecordedRequest] = []
        self.closed_events: list[ClosedEvent] = []
        self.errors: list[Exception] = []  # malformed requests and exceptions from handlers
        self.connections_accepted = 0
        self.raise_errors = raise_errors  # on leaving `async with`, fail if errors were seen
        self._queue: deque[Script] = deque()
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def pending(self) -> int:
        """Scripted responses not used yet."""
        return len(self._queue)

    def script(self, *responses: Script) -> None:
        for response in responses:
            if not (isinstance(response, _Response) or callable(response)):
                raise TypeError(f"not a response or a handler: {response!r}")
        self._queue.extend(responses)

    # -- lifecycle

    async def start(self) -> ScriptedUpstream:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_connection, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the listener and every connection (abruptly), and await every handler."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._connections):
            conn.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.wait_connections_closed(timeout=1)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> ScriptedUpstream:
        return await self.start()

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        await self.stop()
        if self.raise_errors and self.errors and exc_type is None:
            raise AssertionError(f"scripted upstream saw errors: {self.errors!r}") from (
                self.errors[0]
            )

    # -- waiting

    async def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait, event-driven, until `predicate()` holds; TimeoutError after `timeout` s."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed = self._changed
                    if predicate():
                        return
                    await changed.wait()
        except TimeoutError:
            state = (
                f"requests={len(self.requests)} open_connections={self.open_connections} "
                f"closed_events={self.closed_events}"
            )
            raise TimeoutError(f"no {what} within {timeout}s ({state})") from None

    async def wait_for_requests(self, n: int, timeout: float = 2) -> list[RecordedRequest]:
        await self.wait_until(lambda: len(self.requests) >= n, timeout, f"{n} requests")
        return list(self.requests)

    async def wait_for_closed_events(self, n: int, timeout: float = 2) -> list[ClosedEvent]:
        what = f"{n} peer closes"
        await self.wait_until(lambda: len(self.closed_events) >= n, timeout, what)
        return list(self.closed_events)

    async def wait_connections_closed(self, timeout: float = 2) -> None:
        await self.wait_until(lambda: not self._connections, timeout, "closing of all connections")

    # -- called by connections

    def _new_connection(self) -> _Connection:
        self.connections_accepted += 1
        return _Connection(self, self.connections_accepted)

    def _connection_made(self, conn: _Connection) -> None:
        self._connections.add(conn)
        task = asyncio.get_running_loop().create_task(conn.serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._notify()

    def _connection_lost(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self._notify()

    def _peer_closed(self, event: ClosedEvent) -> None:
        self.closed_events.append(event)
        self._notify()

    async def _next_response(self, request: RecordedRequest) -> _Response:
        self.requests.append(request)
        self._notify()
        response = self._queue.popleft() if self._queue else self.default
        if not isinstance(response, _Response):
            response = response(request)
            if inspect.isawaitable(response):
                response = await response
        if not isinstance(response, _Response):
            raise TypeError(f"handler returned {response!r}, not a response")
        return response

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


# ---------------------------------------------------------------------------- payloads


def sse_data(payload: Any) -> bytes:
    """One SSE event carrying `payload` (JSON-encoded unless it is already a str)."""
    text = payload if isinstance(payload, str) else jsonlib.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def chat_chunk(
    delta: dict[str, Any], model: str = "m", finish_reason: str | None = None
) -> dict[str, Any]:
    """An OpenAI `chat.completion.chunk` object."""
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def role_delta(model: str = "m") -> bytes:
    """The content-less first delta a real server sends (it must not commit the response)."""
    return sse_data(chat_chunk({"role": "assistant", "content": ""}, model))


def content(text: str, model: str = "m") -> bytes:
    return sse_data(chat_chunk({"content": text}, model))


def finish(model: str = "m", reason: str = "stop") -> bytes:
    return sse_data(chat_chunk({}, model, finish_reason=reason))


def usage_chunk(prompt: int, completion: int, model: str = "m") -> bytes:
    chunk = chat_chunk({}, model)
    chunk["choices"] = []
    chunk["usage"] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    return sse_data(chunk)


def done() -> bytes:
    return b"data: [DONE]\n\n"


def sse_tokens(
    tokens: Iterable[str],
    model: str = "m",
    role_first: bool = True,
    done: bool = True,
    finish_reason: str | None = "stop",
) -> list[bytes]:
    """A whole stream's items: [role delta] + one content chunk per token + [finish] + [DONE]."""
    items = [role_delta(model)] if role_first else []
    items += [content(token, model) for token in tokens]
    if finish_reason is not None:
        items.append(finish(model, finish_reason))
    if done:
        items.append(b"data: [DONE]\n\n")
    return items


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None) -> bytes:
    """An OpenAI-style JSON error body."""
    error = {"message": message, "type": type, "param": None, "code": code}
    return jsonlib.dumps({"error": error}).encode()
