"""The framing of a gRPC exchange as the engine carries it (see `wire.py`): a frame is a
message; the first message commits (initial metadata is held until then, so a call that fails
before it can still be retried); the trailers frame ends it. After the commit point a failure
ends the call with a status that says what happened, never OK."""

from __future__ import annotations

from gateway.engine import messages
from gateway.engine.framing import Framing
from gateway.errors import GatewayError, UpstreamReset
from gateway.protocols.grpc import wire
from gateway.protocols.grpc.status import failure_code

_HEAD = messages._HEAD


class GrpcMessages(Framing):
    name = "grpc"
    __slots__ = ()

    def cut(self, data: bytes) -> int:
        at, count, size = 0, 0, len(data)
        while size - at >= wire.HEAD_SIZE:
            kind, length = _HEAD.unpack_from(data, at)
            end = at + wire.HEAD_SIZE + length
            if end > size:
                break
            at = end
            count += kind == wire.DATA
        self.frames = count  # messages; the trailers frame is not a chunk
        return at

    def commits(self, frames: bytes) -> bool:
        return any(kind == wire.DATA for kind, _ in messages.split(frames))

    def error_frame(self, err: GatewayError, request_id: str) -> bytes | None:
        details = f"{err.condition}: {err.message}"
        return wire.trailers_frame(failure_code(err), details, (("x-request-id", request_id),))

    def ended(self, tail: bytes) -> GatewayError | None:
        if tail:
            return UpstreamReset(f"the gRPC stream ended inside a message ({len(tail)} bytes)")
        return None
