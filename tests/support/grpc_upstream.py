"""A scriptable gRPC upstream, run as a real child process: `python -m tests.support.grpc_upstream`.

It serves `streamtest.Tokens` (built from descriptors in code, so it needs no generated
stubs) with server reflection and grpc.health.v1. A call's request message scripts it:

    TokensRequest {prompt, n, gap_ms, stall_after, cut_after, fail, fail_after, silent, tag}

`Stream` sends `n` Token messages (`{prompt}-{i}`) `gap_ms` apart, then OK; `fail` (a status
name) ends the call with that status after `fail_after` messages (0: before any); `stall_after`
goes silent after that many messages; `cut_after` kills the whole process after that many
(the connection drops mid-stream); `silent` never answers at all. `One` is unary. Flags set
defaults for every call (`--fail UNAVAILABLE`, `--silent`), so endpoints can differ.

It prints one line per event, which tests wait on: `call TAG METHOD {metadata json} TIMEOUT`,
`cancelled TAG`, `done TAG`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc import aio

PACKAGE, SERVICE = "streamtest", "streamtest.Tokens"
STREAM, ONE, JOIN = f"/{SERVICE}/Stream", f"/{SERVICE}/One", f"/{SERVICE}/Join"
ANNOUNCE = re.compile(r"listening on (?P<url>grpc://\S+)")


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    T = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="streamtest.proto", package=PACKAGE, syntax="proto3"
    )
    request = proto.message_type.add(name="TokensRequest")
    for number, (name, kind) in enumerate(
        [
            ("prompt", T.TYPE_STRING),
            ("n", T.TYPE_INT32),
            ("gap_ms", T.TYPE_INT32),
            ("stall_after", T.TYPE_INT32),
            ("cut_after", T.TYPE_INT32),
            ("fail", T.TYPE_STRING),
            ("fail_after", T.TYPE_INT32),
            ("silent", T.TYPE_BOOL),
            ("tag", T.TYPE_STRING),
        ],
        start=1,
    ):
        request.field.add(name=name, number=number, type=kind, label=T.LABEL_OPTIONAL)
    token = proto.message_type.add(name="Token")
    token.field.add(name="text", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    token.field.add(name="index", number=2, type=T.TYPE_INT32, label=T.LABEL_OPTIONAL)
    service = proto.service.add(name="Tokens")
    service.method.add(
        name="Stream",
        input_type=".streamtest.TokensRequest",
        output_type=".streamtest.Token",
        server_streaming=True,
    )
    service.method.add(
        name="One", input_type=".streamtest.TokensRequest", output_type=".streamtest.Token"
    )
    service.method.add(
        name="Join",
        input_type=".streamtest.TokensRequest",
        output_type=".streamtest.Token",
        client_streaming=True,
    )
    return proto


POOL = descriptor_pool.DescriptorPool()
POOL.Add(file_descriptor())
TokensRequest = message_factory.GetMessageClass(
    POOL.FindMessageTypeByName("streamtest.TokensRequest")
)
Token = message_factory.GetMessageClass(POOL.FindMessageTypeByName("streamtest.Token"))


def request(**fields) -> bytes:
    return TokensRequest(**fields).SerializeToString()


def token(raw: bytes):
    return Token.FromString(raw)


def say(*words) -> None:
    print(*words, flush=True)


class Tokens:
    def __init__(self, defaults: argparse.Namespace) -> None:
        self.defaults = defaults

    async def stream(self, raw: bytes, context: aio.ServicerContext, unary: bool = False):
        req = TokensRequest.FromString(raw)
        tag = req.tag or "-"
        metadata = {
            k: v if isinstance(v, str) else v.hex() for k, v in context.invocation_metadata()
        }
        left = context.time_remaining()
        say(
            "call",
            tag,
            ONE if unary else STREAM,
            json.dumps(metadata),
            f"{left:.3f}" if left else "none",
        )
        fail = req.fail or self.defaults.fail
        try:
            if req.silent or self.defaults.silent:
                await asyncio.Event().wait()
            for i in range(1 if unary else req.n):
                if fail and i == req.fail_after:
                    break
                if req.cut_after and i == req.cut_after:
                    await asyncio.sleep(0.2)  # what was sent leaves the process first
                    os._exit(3)
                if req.stall_after and i == req.stall_after:
                    await asyncio.Event().wait()
                if i and req.gap_ms:
                    await asyncio.sleep(req.gap_ms / 1000)
                yield Token(text=f"{req.prompt}-{i}", index=i).SerializeToString()
            if fail:
                context.set_trailing_metadata((("x-failed-by", "upstream"),))
                await context.abort(getattr(grpc.StatusCode, fail), f"scripted {fail}")
            context.set_trailing_metadata((("x-upstream-trailer", "done"),))
            say("done", tag)
        except asyncio.CancelledError:
            say("cancelled", tag)
            raise

    async def join(self, requests, context: aio.ServicerContext) -> bytes:
        """Client-streaming: one Token with every request's prompt, joined."""
        prompts = [TokensRequest.FromString(raw).prompt async for raw in requests]
        return Token(text="+".join(prompts), index=len(prompts)).SerializeToString()

    async def one(self, raw: bytes, context: aio.ServicerContext) -> bytes:
        async for message in self.stream(raw, context, unary=True):
            return message
        raise AssertionError("unreachable")


async def serve(args: argparse.Namespace) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer
    from grpc_reflection.v1alpha import reflection

    server = aio.server()
    tokens = Tokens(args)
    handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(tokens.stream),
        "One": grpc.unary_unary_rpc_method_handler(tokens.one),
        "Join": grpc.stream_unary_rpc_method_handler(tokens.join),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health = HealthServicer()
    status = (
        health_pb2.HealthCheckResponse.NOT_SERVING
        if args.not_serving
        else health_pb2.HealthCheckResponse.SERVING
    )
    await health.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if not args.no_reflection:
        reflection.enable_server_reflection((SERVICE, reflection.SERVICE_NAME), server, pool=POOL)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    say(f"grpc upstream listening on grpc://127.0.0.1:{port}")
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--fail", default="", help="end every call with this status first")
    parser.add_argument("--silent", action="store_true", help="never answer")
    parser.add_argument("--not-serving", action="store_true", help="health says NOT_SERVING")
    parser.add_argument("--no-reflection", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
