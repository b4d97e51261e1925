"""Checks on gRPC upstreams and on the routes that use them (gRPC calls, HTTP bridges)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from gateway.config.descriptor_sets import DescriptorSetError, find_method
from gateway.config.model import GatewayConfig, GrpcUpstream, WorkerPoolUpstream
from gateway.config.routes import Route
from gateway.config.rules import Problem, Problems, at_least, positive

METHOD_NAME = re.compile(r"/[A-Za-z_][\w.]*\.?[A-Za-z_]\w*/[A-Za-z_]\w*")
"""`/package.Service/Method` (a service without a package is allowed)."""


def check_grpc_upstream(path: str, upstream: GrpcUpstream) -> Problems:
    if not upstream.endpoints:
        yield Problem(f"{path}.endpoints", "list at least one endpoint")
    for i, endpoint in enumerate(upstream.endpoints):
        yield from _grpc_url(f"{path}.endpoints[{i}].url", endpoint.url)
        yield from at_least(f"{path}.endpoints[{i}].weight", endpoint.weight, 1)
    if upstream.health is not None:
        for name in ("interval", "timeout"):
            yield from positive(f"{path}.health.{name}", getattr(upstream.health, name), "s")
        yield from at_least(f"{path}.health.unhealthy_after", upstream.health.unhealthy_after, 1)
    yield from at_least(f"{path}.max_message_size", upstream.max_message_size, 1)


def _grpc_url(path: str, url: str) -> Problems:
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("grpc", "grpcs") and bool(parts.hostname)
        valid = valid and parts.path in ("", "/") and not parts.query
        parts.port  # noqa: B018 -- raises ValueError on a port out of range
    except ValueError:
        valid = False
    if not valid:
        yield Problem(path, f"invalid url '{url}' (use grpc://host:port or grpcs://host:port)")


def check_grpc_route(path: str, route: Route, cfg: GatewayConfig) -> Problems:
    """The protocol blocks of one route agree with each other and with its upstreams."""
    blocks = [b for b in ("websocket", "grpc", "grpc_bridge") if getattr(route, b) is not None]
    if len(blocks) > 1:
        yield Problem(f"{path}.{blocks[1]}", f"a route takes one of {' or '.join(blocks)}")
        return
    wants_grpc = route.grpc is not None or route.grpc_bridge is not None
    for where, name in _hops(path, route):
        upstream = cfg.upstreams.get(name)
        if upstream is None:
            continue  # reported as an unknown upstream
        is_grpc = isinstance(upstream, GrpcUpstream) or (
            isinstance(upstream, WorkerPoolUpstream) and upstream.protocol == "grpc"
        )
        if is_grpc and not wants_grpc:
            message = (
                f"upstream '{name}' speaks gRPC: the route needs a grpc block (gRPC calls) or "
                "grpc_bridge (HTTP requests served by a gRPC method)"
            )
            yield Problem(where, message)
        elif wants_grpc and not is_grpc:
            yield Problem(where, f"upstream '{name}' does not speak gRPC (kind {upstream.kind})")
    if route.grpc is not None:
        yield from _call_route(path, route)
    if route.grpc_bridge is not None:
        yield from _bridge(path, route)


def _hops(path: str, route: Route):
    yield f"{path}.upstream", route.upstream
    for j, fallback in enumerate(route.fallbacks):
        yield f"{path}.fallbacks[{j}].upstream", fallback.upstream


def _call_route(path: str, route: Route) -> Problems:
    if route.match.model is not None:
        yield Problem(f"{path}.match.model", "a gRPC call has no JSON body: no model to match")
    if route.match.methods is not None:
        yield Problem(f"{path}.match.methods", "every gRPC call is a POST: leave methods out")
    for j, fallback in enumerate(route.fallbacks):
        if fallback.model is not None:
            message = "a gRPC call's messages are relayed as they are: no model to rewrite"
            yield Problem(f"{path}.fallbacks[{j}].model", message)
    if route.framing.kind != "auto":
        yield Problem(f"{path}.framing", "a gRPC call is framed as gRPC messages: leave it out")
    if route.keepalive is not None:
        yield Problem(f"{path}.keepalive", "SSE keepalives do not apply to gRPC calls")


def _bridge(path: str, route: Route) -> Problems:
    bridge = route.grpc_bridge
    if not METHOD_NAME.fullmatch(bridge.method):
        message = f"'{bridge.method}' is not a method name (/package.Service/Method)"
        yield Problem(f"{path}.grpc_bridge.method", message)
        return
    if bridge.descriptor_set is not None:
        try:
            find_method(bridge.descriptor_set, bridge.method)
        except DescriptorSetError as exc:
            yield Problem(f"{path}.grpc_bridge.descriptor_set", str(exc))
