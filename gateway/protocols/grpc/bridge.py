"""HTTP requests served by a gRPC method (a route's `grpc_bridge`): the other pool client of a
gRPC upstream.

The JSON request body becomes the method's request message (google.protobuf.json_format,
with its field names or their lowerCamel JSON names; an unknown field is a 400), sent as a
call like any other (`client.py`). The answer is read as an HTTP body: before the first
message a status is its HTTP status (the standard table) with a JSON error body, so retries
and fallbacks judge it as for HTTP; each message is one SSE `data: {json}` event (or one
NDJSON line), a clean end `data: [DONE]`, and a status that is not OK after the first
message is the stream's failure (`event: error`, or an aborted NDJSON body).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from contextvars import ContextVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.grpc_status import name_of
from gateway.config.routes import GrpcBridgeConfig, Route
from gateway.engine import messages
from gateway.engine.commit import AttemptFailed
from gateway.engine.context import RequestContext
from gateway.engine.framing import Ndjson, Sse
from gateway.errors import BadRequest, UpstreamStatus
from gateway.protocols.grpc import wire
from gateway.protocols.grpc.client import GrpcClient, GrpcResponse, split_url
from gateway.protocols.grpc.descriptors import Descriptors, DescriptorSetError, MethodTypes
from gateway.upstreams.endpoint import Endpoint

BRIDGE: ContextVar[GrpcBridgeConfig | None] = ContextVar("grpc_bridge", default=None)
"""The route's `grpc_bridge`, set for the request's tries once it is admitted."""

DONE = b"data: [DONE]\n\n"


def enter_bridge(ctx: RequestContext, route: Route) -> None:
    """The request is admitted on a bridge route: its tries call the route's method (whatever
    the request's path, which stays what the client sent, for logs)."""
    BRIDGE.set(route.grpc_bridge)
    ctx.upstream_protocol = "grpc_bridge"


class BridgeClient:
    def __init__(self, grpc: GrpcClient) -> None:
        self.grpc = grpc
        self.broken = grpc.broken
        self.descriptors = Descriptors()

    async def start(self) -> None:
        """The gRPC client is started with the pool."""

    async def close(self) -> None:
        """Closed with the gRPC client."""

    def drop_idle(self, endpoint: Endpoint) -> None:
        self.grpc.drop_idle(endpoint)

    async def send(
        self,
        method: str,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        connect_timeout: float,
        on_sent: Callable[[bool], None],
        deadline: float = float("inf"),
    ) -> BridgeResponse:
        bridge = BRIDGE.get()
        base, _ = split_url(url)
        channel, _ = await self.grpc.connect(base, connect_timeout)
        try:
            types = await self.descriptors.of(bridge, channel)
        except DescriptorSetError as exc:
            err = UpstreamStatus(f"cannot describe {bridge.method}: {exc}", 502)
            raise AttemptFailed(err, ("descriptors",), ejects=False) from None
        request = wire.request_body((_request_message(body, types),))
        call_url = base + bridge.method
        response = await self.grpc.send(
            method, call_url, request, headers, connect_timeout, on_sent, deadline
        )
        return BridgeResponse(response, types, bridge.output == "sse")


def _request_message(body: bytes, types: MethodTypes) -> bytes:
    try:
        message = json_format.Parse(body or b"{}", types.request())
    except (json_format.ParseError, ValueError, RecursionError) as exc:
        err = BadRequest(f"the request body is not a {types.request.DESCRIPTOR.full_name}: {exc}")
        # The client's mistake: final, and no fault of the endpoint's.
        raise AttemptFailed(err, ("bad_request",), ejects=False) from None
    return message.SerializeToString()


class BridgeResponse:
    """A call read as an SSE (or NDJSON) body."""

    __slots__ = ("status", "headers", "conditions", "framing", "_call", "_types", "_sse")
    send = None
    stream = None

    def __init__(self, call: GrpcResponse, types: MethodTypes, sse: bool) -> None:
        self.status, self.conditions = call.status, call.conditions
        self._call, self._types, self._sse = call, types, sse
        if call.status >= 400:
            content_type, self.framing = "application/json", None
        elif sse:
            content_type, self.framing = "text/event-stream", Sse()
        else:
            content_type, self.framing = "application/x-ndjson", Ndjson()
        # As an HTTP client's response headers are: the HTTP sink filters them the same way.
        self.headers = CIMultiDictProxy(CIMultiDict({"Content-Type": content_type}))

    async def read(self) -> bytes:
        data = await self._call.read()
        if not data:
            return b""
        ((kind, payload),) = messages.split(data)  # the call reads one frame at a time
        if kind == wire.DATA:
            event = _json(payload, self._types.response)
            return b"data: " + event + b"\n\n" if self._sse else event + b"\n"
        code, details, _ = wire.read_trailers(payload)
        if code == 0:
            return DONE if self._sse else b""
        if self.status >= 400:  # before the first message: the answer's JSON error body
            error = {"type": "upstream_error", "code": name_of(code), "message": details}
            return json.dumps({"error": error}).encode()
        err = UpstreamStatus(f"upstream ended the call with {name_of(code)}: {details}", 502)
        err.condition = name_of(code)
        raise err

    def release(self) -> None:
        self._call.release()

    def close(self) -> None:
        self._call.close()


def _json(payload: bytes, response: type[Message]) -> bytes:
    try:
        message = response.FromString(payload)
    except DecodeError as exc:
        name = response.DESCRIPTOR.full_name
        message = f"the upstream sent a message that is not a {name}: {exc}"
        raise UpstreamStatus(message, 502) from None
    as_dict = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(as_dict, separators=(",", ":"), ensure_ascii=False).encode()
