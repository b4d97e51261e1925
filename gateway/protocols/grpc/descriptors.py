"""The message types of a bridged gRPC method: from the route's descriptor set file, or asked
of the upstream by server reflection (`grpc.reflection.v1`, else `v1alpha`: the same
messages under two names). Found once per upstream and method, and kept until a reload."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pb2, message_factory
from google.protobuf.descriptor import MethodDescriptor
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2

from gateway.config.descriptor_sets import (
    DescriptorSetError,
    find_method,
    method_in,
    pool_of,
    symbol_of,
)
from gateway.config.routes import GrpcBridgeConfig

REFLECTION = (
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
_MAX_FILES = 64
"""Bound on the files one method's descriptors may span (dependencies included)."""


@dataclass(frozen=True, slots=True)
class MethodTypes:
    request: type
    response: type


class Descriptors:
    """One upstream's bridged methods, by (descriptor set, method)."""

    def __init__(self) -> None:
        self._known: dict[tuple[str | None, str], MethodTypes] = {}

    async def of(self, bridge: GrpcBridgeConfig, channel: aio.Channel) -> MethodTypes:
        """Raises DescriptorSetError when the method cannot be described."""
        key = (bridge.descriptor_set, bridge.method)
        found = self._known.get(key)
        if found is None:
            if bridge.descriptor_set is not None:
                described = find_method(bridge.descriptor_set, bridge.method)
            else:
                described = await reflect(channel, bridge.method)
            found = self._known[key] = _types(described)
        return found


def _types(described: MethodDescriptor) -> MethodTypes:
    return MethodTypes(
        message_factory.GetMessageClass(described.input_type),
        message_factory.GetMessageClass(described.output_type),
    )


async def reflect(channel: aio.Channel, method: str) -> MethodDescriptor:
    """The method as the server's reflection describes it, dependencies fetched as needed."""
    service, _ = symbol_of(method)
    files = {f.name: f for f in await _ask(channel, file_containing_symbol=service)}
    while missing := [d for f in list(files.values()) for d in f.dependency if d not in files]:
        if len(files) >= _MAX_FILES:
            raise DescriptorSetError(f"the descriptors of {method} span over {_MAX_FILES} files")
        for file in await _ask(channel, file_by_filename=missing[0]):
            files.setdefault(file.name, file)
        if missing[0] not in files:
            raise DescriptorSetError(f"server reflection did not send '{missing[0]}'")
    return method_in(pool_of(files.values()), method)


async def _ask(channel: aio.Channel, **question) -> list[descriptor_pb2.FileDescriptorProto]:
    """One question, to `grpc.reflection.v1` and, if that fails, to `v1alpha`. (A server
    without v1 may end the call before its request is written, which grpc-core can report as
    INTERNAL rather than UNIMPLEMENTED: any failure of v1 is worth asking v1alpha.)"""
    request = reflection_pb2.ServerReflectionRequest(**question).SerializeToString()
    failure: aio.AioRpcError | None = None
    for path in REFLECTION:
        try:
            async for raw in channel.stream_stream(path)(iter((request,))):
                return _files(reflection_pb2.ServerReflectionResponse.FromString(raw))
            raise DescriptorSetError("server reflection sent no answer")
        except aio.AioRpcError as exc:
            failure = exc
    if failure.code() is grpc.StatusCode.UNIMPLEMENTED:
        raise DescriptorSetError("the upstream serves no server reflection")
    raise DescriptorSetError(
        f"server reflection failed: {failure.code().name}: {failure.details()}"
    )


def _files(answer) -> list[descriptor_pb2.FileDescriptorProto]:
    if answer.HasField("error_response"):
        error = answer.error_response
        message = f"server reflection answered {error.error_code}: {error.error_message}"
        raise DescriptorSetError(message)
    protos = answer.file_descriptor_response.file_descriptor_proto
    return [descriptor_pb2.FileDescriptorProto.FromString(p) for p in protos]
