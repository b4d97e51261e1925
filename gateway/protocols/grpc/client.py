"""The gRPC upstream client: one HTTP/2 channel per endpoint, shared by every call to it.

Calls are generic (no stubs, bytes in and out): a request of one message is sent as a
server-streaming call, which on the wire is also what a unary call is; several messages (a
client-streaming request, buffered) as a streaming one. gRPC's own retries are off (retries
are the route's), and each channel keeps its own connection, so a channel that failed can be
replaced by one that really tries again.

This is where grpcio meets the engine: a connection that cannot be made is
`UpstreamConnectError`; a status the client library made up because the exchange broke is
`GrpcBroken` (the condition `reset`); a status the upstream sent is its answer, judged by the
engine like an HTTP status (`status.py`). `send` returns once the first message or the end of
the call is in hand; the answer is then read as frames (`wire.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import grpc
from grpc import aio

from gateway.errors import UpstreamConnectError
from gateway.protocols.grpc import wire
from gateway.protocols.grpc.framing import GrpcMessages
from gateway.protocols.grpc.metadata import as_headers, forwarded
from gateway.protocols.grpc.status import (
    code_of,
    conditions_of,
    http_status,
    transport_failure,
)
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.pool import UpstreamPool

READY, FAILED = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE


class GrpcBroken(Exception):
    """The HTTP/2 stream or connection broke: the upstream sent no status of its own."""


class GrpcClient:
    """A pool's upstream side over gRPC."""

    broken = (GrpcBroken,)

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self._channels: dict[str, aio.Channel] = {}
        self._retiring: set[asyncio.Task] = set()
        self._options = (
            ("grpc.enable_retries", 0),
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", getattr(pool.config, "max_message_size", -1)),
            ("grpc.max_send_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.primary_user_agent", "streamgate"),
        )

    async def start(self) -> None:
        """Channels are opened on first use."""

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        if self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def drop_idle(self, endpoint: Endpoint) -> None:
        channel = self._channels.pop(endpoint.url, None)
        if channel is not None:
            self._retire(channel)

    def channel(self, base: str) -> aio.Channel:
        """The endpoint's channel (opened now if it has none)."""
        channel = self._channels.get(base)
        if channel is None:
            channel = self._channels[base] = self._open(base)
        return channel

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        connect_timeout: float,
        on_sent: Callable[[bool], None],
        deadline: float = float("inf"),
    ) -> GrpcResponse:
        base, path = split_url(url)
        channel, reused = await self.connect(base, connect_timeout)
        on_sent(reused)
        left = deadline - asyncio.get_running_loop().time()
        timeout = max(left, 0.001) if left != float("inf") else None
        metadata = forwarded(headers, self.pool.headers)
        requests = wire.request_messages(body)
        if len(requests) == 1:
            call = channel.unary_stream(path)(requests[0], metadata=metadata, timeout=timeout)
        else:
            call = channel.stream_stream(path)(iter(requests), metadata=metadata, timeout=timeout)
        try:
            return await GrpcResponse.first(call)
        except BaseException:
            call.cancel()  # a try given up (timeout, client gone) stops the upstream at once
            raise

    async def connect(self, base: str, timeout: float) -> tuple[aio.Channel, bool]:
        """A ready channel to `base`, and whether it already was (a reused connection)."""
        channel = self.channel(base)
        state = channel.get_state(try_to_connect=True)
        if state is READY:
            return channel, True
        if state is FAILED:  # waiting out grpc-core's backoff: connect afresh instead
            self._retire(self._channels.pop(base))
            channel = self.channel(base)
            state = channel.get_state(try_to_connect=True)
        name = self.pool.name
        try:
            async with asyncio.timeout(timeout):
                while state is not READY:
                    if state is FAILED:
                        message = f"cannot connect to upstream {name!r} at {base}"
                        raise UpstreamConnectError(message, refused=True)
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
        except TimeoutError:
            message = f"cannot connect to upstream {name!r} at {base} within {timeout:g}s"
            raise UpstreamConnectError(message) from None
        return channel, False

    def _open(self, base: str) -> aio.Channel:
        scheme, _, target = base.partition("://")
        if scheme == "grpcs":
            credentials = grpc.ssl_channel_credentials()
            return aio.secure_channel(target, credentials, options=self._options)
        return aio.insecure_channel(target, options=self._options)

    def _retire(self, channel: aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)


def split_url(url: str) -> tuple[str, str]:
    """`grpc://host:port/pkg.Service/Method` → ("grpc://host:port", "/pkg.Service/Method")."""
    scheme, _, rest = url.partition("://")
    target, _, path = rest.partition("/")
    return f"{scheme}://{target}", "/" + path


class GrpcResponse:
    """A call as the engine reads it: a data frame per message, then the trailers frame."""

    __slots__ = ("status", "headers", "conditions", "framing", "_call", "_pending")
    send = None  # the request went whole; nothing more goes upstream
    stream = None  # pulled: one message per read

    def __init__(self, status: int, headers, conditions: tuple[str, ...]) -> None:
        self.status = status
        self.headers = headers
        self.conditions = conditions
        self.framing = GrpcMessages()
        self._call: aio.Call | None = None
        self._pending: bytes | None = None

    @classmethod
    async def first(cls, call) -> GrpcResponse:
        """Wait for the call's first message or its end."""
        try:
            message = await call.read()
        except aio.AioRpcError as exc:
            if transport_failure(exc):
                raise GrpcBroken(f"{exc.code().name}: {exc.details()}") from None
            return cls.ended(
                code_of(exc.code()),
                exc.details() or "",
                tuple(exc.trailing_metadata() or ()),
                tuple(exc.initial_metadata() or ()),
            )
        if message is aio.EOF:
            trailing = tuple(await call.trailing_metadata() or ())
            code = code_of(await call.code())
            return cls.ended(code, await call.details() or "", trailing, ())
        response = cls(200, as_headers(await call.initial_metadata() or ()), ())
        response._call, response._pending = call, wire.data_frame(message)
        return response

    @classmethod
    def ended(cls, code: int, details: str, trailing, initial) -> GrpcResponse:
        """A call that ended before any message (a trailers-only answer, whose trailers are
        its headers too: a `retry-after` there is seen)."""
        status = 200 if code == 0 else http_status(code)
        response = cls(status, as_headers(initial + trailing), conditions_of(code) if code else ())
        response._pending = wire.trailers_frame(code, details, trailing)
        return response

    async def read(self) -> bytes:
        pending = self._pending
        if pending is not None:
            self._pending = None
            return pending
        call = self._call
        if call is None:
            return b""
        try:
            message = await call.read()
        except aio.AioRpcError as exc:
            self._call = None
            if transport_failure(exc):
                raise GrpcBroken(f"{exc.code().name}: {exc.details()}") from None
            trailing = tuple(exc.trailing_metadata() or ())
            return wire.trailers_frame(code_of(exc.code()), exc.details() or "", trailing)
        if message is aio.EOF:
            self._call = None
            trailing = tuple(await call.trailing_metadata() or ())
            return wire.trailers_frame(code_of(await call.code()), "", trailing)
        return wire.data_frame(message)

    def release(self) -> None:
        self._call = None

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()  # RST_STREAM: the upstream's handler is cancelled at once
            self._call = None
