"""The gRPC server side: a call in, the engine's pipeline, a call answered.

One generic handler takes every method, so no proto files are needed: messages stay opaque
bytes. A call's request messages are read whole (bounded by `server.max_request_body`, within
`server.body_timeout`) so retries can replay them; unary, server-streaming and
client-streaming calls are relayed, a bidirectional one (whose client waits for answers
before it ends its requests) runs out of `body_timeout`. The caller's deadline bounds the
call and goes upstream shortened by the time spent. grpc-core cancels the handler when the
client cancels or its deadline passes, which the engine treats as a disconnect.
"""

from __future__ import annotations

import asyncio
from functools import partial
from urllib.parse import unquote

import grpc
from grpc import aio

from gateway.config.model import ServerConfig
from gateway.engine.context import RequestContext, request_id_from
from gateway.engine.pipeline import Proxy
from gateway.errors import RequestTimeout, RequestTooLarge
from gateway.protocols.grpc import wire
from gateway.protocols.grpc.metadata import as_headers
from gateway.protocols.grpc.sink import GrpcSink


class GrpcServer:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self._server: aio.Server | None = None
        self.address = ""
        """host:port bound, once started."""

    async def start(self, server: ServerConfig) -> str:
        """Listen on `server.grpc_listen`; the address bound, as host:port."""
        host, port = server.grpc_listen
        self._server = aio.server(
            options=(
                ("grpc.max_receive_message_length", server.max_request_body),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),
            )
        )
        self._server.add_generic_rpc_handlers((_AnyMethod(self.handle),))
        shown = f"[{host}]" if ":" in host else host
        bound = self._server.add_insecure_port(f"{shown}:{port}")
        await self._server.start()
        self.address = f"{shown}:{bound}"
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def handle(self, method: str, requests, context: aio.ServicerContext) -> None:
        metadata = as_headers(context.invocation_metadata() or ())
        ctx = RequestContext(
            request_id_from(_text(metadata.get("x-request-id"))),
            "POST",
            method,
            peer_address(context.peer()),
            asyncio.get_running_loop(),
        )
        ctx.protocol = ctx.upstream_protocol = "grpc"
        sink = GrpcSink(context, ctx)
        await self.proxy.serve(ctx, GrpcInbound(requests, context, ctx, metadata), sink)


class _AnyMethod(grpc.GenericRpcHandler):
    """Every method, as a streaming call of raw bytes (the most general shape on the wire)."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.stream_stream_rpc_method_handler(partial(self._handle, details.method))


class GrpcInbound:
    """A gRPC call as the engine's `Inbound`: its method is the route path, its metadata the
    headers (lower-case keys)."""

    __slots__ = ("requests", "context", "ctx", "headers", "route_path")

    def __init__(self, requests, context, ctx: RequestContext, metadata: dict) -> None:
        self.requests, self.context, self.ctx = requests, context, ctx
        self.headers = metadata
        self.route_path = ctx.path

    async def read(self, server: ServerConfig) -> None:
        ctx = self.ctx
        left = self.context.time_remaining()
        if left is not None:
            ctx.deadline = asyncio.get_running_loop().time() + left
        limit, received, size = server.max_request_body, [], 0
        try:
            async with asyncio.timeout(server.body_timeout):
                async for message in self.requests:
                    size += len(message)
                    if size > limit:
                        raise RequestTooLarge(f"request messages of over {limit} bytes")
                    received.append(message)
        except TimeoutError:
            message = (
                f"the request messages did not end within {server.body_timeout:g}s "
                "(bidirectional calls are not relayed)"
            )
            raise RequestTimeout(message) from None
        ctx.body = wire.request_body(received)

    async def admitted(self, route) -> None:
        """Everything was read before routing."""

    def upstream_headers(self) -> dict:
        ctx = self.ctx
        headers = dict(self.headers)
        headers["x-request-id"] = ctx.request_id
        forwarded_for = _text(headers.get("x-forwarded-for"))
        if ctx.client_ip:
            joined = f"{forwarded_for}, {ctx.client_ip}" if forwarded_for else ctx.client_ip
            headers["x-forwarded-for"] = joined
        return headers


def peer_address(peer: str | None) -> str:
    """The client's IP from grpc-core's peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`)."""
    if not peer:
        return ""
    family, _, rest = unquote(peer).partition(":")
    if family == "ipv4":
        return rest.rpartition(":")[0]
    if family == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    return ""


def _text(value) -> str | None:
    return value if isinstance(value, str) else None
