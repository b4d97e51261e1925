"""Protobuf descriptors of a gRPC method, from a FileDescriptorSet file or from the files a
server's reflection sent: what an HTTP-to-gRPC bridge transcodes JSON with.

A method name is written as on the wire, `/package.Service/Method`. Files are looked up
lazily through a descriptor database, so they may come in any order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable

from google.protobuf import descriptor_database, descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError

from gateway.config.model import GatewayConfig


def anchor_descriptor_sets(cfg: GatewayConfig, base: str) -> GatewayConfig:
    """A relative `grpc_bridge.descriptor_set` is relative to the config file's directory."""
    routes = tuple(
        dataclasses.replace(
            r,
            grpc_bridge=dataclasses.replace(
                r.grpc_bridge, descriptor_set=os.path.join(base, r.grpc_bridge.descriptor_set)
            ),
        )
        if r.grpc_bridge is not None
        and r.grpc_bridge.descriptor_set
        and not os.path.isabs(r.grpc_bridge.descriptor_set)
        else r
        for r in cfg.routes
    )
    return dataclasses.replace(cfg, routes=routes)


class DescriptorSetError(Exception):
    """The descriptors could not be read, or do not describe the method."""


def symbol_of(method: str) -> tuple[str, str]:
    """`/package.Service/Method` → ("package.Service", "Method")."""
    service, _, name = method.strip("/").partition("/")
    return service, name


def pool_of(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> descriptor_pool.DescriptorPool:
    database = descriptor_database.DescriptorDatabase()
    for file in files:
        # The same file may come twice (reflection repeats shared dependencies).
        with contextlib.suppress(descriptor_database.Error):
            database.Add(file)
    return descriptor_pool.DescriptorPool(database)


def method_in(pool: descriptor_pool.DescriptorPool, method: str) -> MethodDescriptor:
    service, name = symbol_of(method)
    try:
        found = pool.FindServiceByName(service)
    except KeyError:
        raise DescriptorSetError(f"no service '{service}' in the descriptors") from None
    except TypeError as exc:  # a file whose dependencies are missing
        raise DescriptorSetError(f"incomplete descriptors: {exc}") from None
    described = found.methods_by_name.get(name)
    if described is None:
        known = ", ".join(sorted(found.methods_by_name)) or "none"
        raise DescriptorSetError(f"service '{service}' has no method '{name}' (it has: {known})")
    return described


def read_descriptor_set(path: str) -> descriptor_pb2.FileDescriptorSet:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DescriptorSetError(f"cannot read '{path}': {exc.strerror}") from None
    try:
        return descriptor_pb2.FileDescriptorSet.FromString(data)
    except DecodeError:
        raise DescriptorSetError(f"'{path}' is not a FileDescriptorSet") from None


def find_method(path: str, method: str) -> MethodDescriptor:
    """The method as the descriptor set file at `path` describes it."""
    return method_in(pool_of(read_descriptor_set(path).file), method)
