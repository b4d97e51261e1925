"""The WebSocket upstream client: one session per try, over the pool's HTTP session.

A handshake is an exchange like any other for the engine: a connect failure is
`UpstreamConnectError`, an answer other than 101 is that status (an error body is not read:
aiohttp does not keep it), and a dropped connection is `reset`. After the 101 the response is
read as message envelopes (`engine/messages.py`), and `send` carries the client's envelopes
the other way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from contextvars import ContextVar

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.engine import messages
from gateway.engine.framing import Messages
from gateway.errors import UpstreamConnectError
from gateway.protocols.http.client import REQUEST_SENT, HttpClient

MAX_MESSAGE: ContextVar[int] = ContextVar("max_message", default=1 << 20)
"""The route's `websocket.max_message_size`, set by the session's handler before its tries."""

_UNSENDABLE = {1005: messages.NORMAL, 1006: messages.GOING_AWAY, 1015: messages.GOING_AWAY}
"""Close codes that describe a close but may not be sent in one (RFC 6455 7.4.1)."""


class WsClient:
    """A pool's WebSocket side: shares the pool's HTTP client session and its connect hook."""

    broken = (aiohttp.ClientError, ConnectionError)

    def __init__(self, http: HttpClient) -> None:
        self.http = http

    async def start(self) -> None:
        """The HTTP client's session is started with the pool."""

    async def close(self) -> None:
        """Closed with the HTTP client's session."""

    def drop_idle(self, endpoint) -> None:
        """WebSocket connections are never pooled."""

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        connect_timeout: float,
        on_sent: Callable[[bool], None],
        deadline: float = float("inf"),
    ):
        pool = self.http.pool
        forward = CIMultiDict(
            (k, v) for k, v in headers.items() if not k.lower().startswith("sec-websocket-")
        )
        for name, value in pool.headers:
            forward[name] = value
        offered = headers.get("sec-websocket-protocol", "")
        protocols = [p.strip() for p in offered.split(",") if p.strip()]
        sent = REQUEST_SENT.set(on_sent)
        try:
            ws = await self.http.session.ws_connect(
                URL("ws" + url[4:] if url.startswith("http") else url, encoded=True),
                protocols=protocols,
                headers=forward,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=connect_timeout),
                autoclose=False,  # a close is answered once both sides have been told
                autoping=True,  # pings are answered per hop
                max_msg_size=MAX_MESSAGE.get(),
                compress=0,  # messages are relayed as they come, never recompressed
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status >= 400:
                return _Refused(exc.status, exc.headers or {})
            raise ConnectionResetError(f"upstream refused the WebSocket upgrade: {exc}") from exc
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            refused = isinstance(getattr(exc, "os_error", None), ConnectionRefusedError)
            message = f"cannot connect to upstream {pool.name!r}: {exc}"
            raise UpstreamConnectError(message, refused=refused) from exc
        finally:
            REQUEST_SENT.reset(sent)
        return WsResponse(ws)


class _Refused:
    """A handshake answered with an error status: judged by the engine like any other."""

    framing = None
    send = None
    conditions = ()

    def __init__(self, status: int, headers) -> None:
        self.status, self.headers = status, headers

    async def read(self) -> bytes:
        return b""

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class WsResponse:
    """An open upstream WebSocket as the engine reads it: one envelope per message."""

    status = 101
    conditions = ()
    __slots__ = ("ws", "headers", "framing", "_ended", "_we_closed")

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.headers = ws._response.headers  # the handshake's: the subprotocol chosen
        self.framing = Messages()
        self._ended = False
        self._we_closed = False

    async def read(self) -> bytes:
        if self._ended:
            return b""
        msg = await self.ws.receive()
        kind = msg.type
        if kind is aiohttp.WSMsgType.TEXT:
            return messages.envelope(messages.TEXT, msg.data.encode())
        if kind is aiohttp.WSMsgType.BINARY:
            return messages.envelope(messages.BINARY, msg.data)
        self._ended = True
        if kind is aiohttp.WSMsgType.CLOSE:
            if not self._we_closed:
                code = _UNSENDABLE.get(msg.data, msg.data)
                await self.ws.close(code=code, message=(msg.extra or "").encode())
            return messages.close_envelope(msg.data, msg.extra or "")
        if kind is aiohttp.WSMsgType.ERROR and getattr(msg.data, "code", None) == messages.TOO_BIG:
            return messages.close_envelope(messages.TOO_BIG, "upstream message too big")
        if self._we_closed:
            return b""
        # Gone without a close frame: a cut, never a clean end. (Not a ConnectionResetError:
        # the relay reads that as the *client* gone.)
        raise aiohttp.ServerDisconnectedError(f"upstream WebSocket lost ({msg.data or kind.name})")

    async def send(self, envelope: bytes) -> None:
        kind, payload = envelope[0], envelope[messages.HEAD_SIZE :]
        if kind == messages.CLOSE:
            code, reason = messages.close_of(payload)
            code = _UNSENDABLE.get(code, code)
            self._we_closed = True
            # Sent at once, so the upstream stops; its answering close ends the relay.
            payload = struct.pack(">H", code) + reason.encode()[:123]
            await self.ws.send_frame(payload, aiohttp.WSMsgType.CLOSE)
            return
        opcode = aiohttp.WSMsgType.TEXT if kind == messages.TEXT else aiohttp.WSMsgType.BINARY
        await self.ws.send_frame(payload, opcode)

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        # The upgraded connection is detached from the response (closing that alone leaves
        # it open): close its transport, after whatever close frame is queued, so the
        # upstream sees the session end at once.
        self.ws._response.close()
        self.ws._writer.transport.close()
