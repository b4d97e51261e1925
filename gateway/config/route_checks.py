"""Checks on routes: their upstreams and limits exist, their match and retry policy hold."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from gateway.config.grpc_checks import check_grpc_route
from gateway.config.grpc_status import GRPC_STATUS_NAMES
from gateway.config.model import GatewayConfig
from gateway.config.routes import RetryPolicy, Route, RouteMatch
from gateway.config.rules import (
    Problem,
    Problems,
    absolute_path,
    at_least,
    did_you_mean,
    known,
    positive,
)

RETRY_CONDITIONS = ("connect_error", "reset", "empty_body", "first_chunk_timeout", "pool_exhausted")
"""Retry conditions with a fixed meaning; other words in retry lists are upstream error codes."""
_STATUS = re.compile(r"[-+]?\d+")


def check_routes(cfg: GatewayConfig) -> Problems:
    if not cfg.routes:
        yield Problem("routes", "define at least one route")
    first_index: dict[str, int] = {}
    for i, route in enumerate(cfg.routes):
        path = f"routes[{i}]"
        if route.name in first_index:
            first = f"routes[{first_index[route.name]}]"
            yield Problem(f"{path}.name", f"duplicate route name '{route.name}' (also {first})")
        first_index.setdefault(route.name, i)
        yield from _route(path, route, cfg)


def _route(path: str, route: Route, cfg: GatewayConfig) -> Problems:
    yield from known(f"{path}.upstream", route.upstream, "upstream", cfg.upstreams)
    for j, fallback in enumerate(route.fallbacks):
        upstream_path = f"{path}.fallbacks[{j}].upstream"
        yield from known(upstream_path, fallback.upstream, "upstream", cfg.upstreams)
    limits = cfg.limits
    yield from _route_limits(path, route, {**limits.rate, **limits.tokens, **limits.concurrency})
    yield from _match(f"{path}.match", route.match)
    for field in dataclasses.fields(route.timeouts):
        value = getattr(route.timeouts, field.name)
        yield from positive(f"{path}.timeouts.{field.name}", value, "s")
    yield from _retry(f"{path}.retry", route.retry)
    yield from at_least(f"{path}.buffer.chunks", route.buffer.chunks, 1)
    yield from at_least(f"{path}.buffer.bytes", route.buffer.bytes, 1)
    if route.keepalive is not None:
        yield from positive(f"{path}.keepalive", route.keepalive, "s")
    if route.framing.require_footer and route.framing.kind != "truss":
        message = f"only a truss framing has a footer (this route's is {route.framing.kind})"
        yield Problem(f"{path}.framing.require_footer", message)
    if route.websocket is not None:
        yield from _websocket(path, route)
    yield from check_grpc_route(path, route, cfg)


def _websocket(path: str, route: Route) -> Problems:
    ws = route.websocket
    yield from at_least(f"{path}.websocket.max_message_size", ws.max_message_size, 1)
    yield from positive(f"{path}.websocket.idle", ws.idle, "s")
    if route.match.model is not None:
        # A session is routed on its upgrade request, which has no body to read a model from.
        message = "a websocket route is chosen before any message arrives: no model to match"
        yield Problem(f"{path}.match.model", message)


def _route_limits(path: str, route: Route, limits: Mapping[str, object]) -> Problems:
    for k, name in enumerate(route.limits):
        if name in route.limits[:k]:
            yield Problem(f"{path}.limits[{k}]", f"limit '{name}' is listed twice")
        else:
            yield from known(f"{path}.limits[{k}]", name, "limit", limits)


def _match(path: str, match: RouteMatch) -> Problems:
    if match.path is not None and match.path_prefix is not None:
        yield Problem(f"{path}.path_prefix", "set either path or path_prefix, not both")
    yield from absolute_path(f"{path}.path", match.path)
    yield from absolute_path(f"{path}.path_prefix", match.path_prefix)
    if match.methods == ():
        yield Problem(f"{path}.methods", "must not be empty (leave it out to match any method)")


def _retry(path: str, retry: RetryPolicy) -> Problems:
    yield from at_least(f"{path}.attempts", retry.attempts, 1)
    for listed in ("on", "fallback_on"):
        for j, condition in enumerate(getattr(retry, listed)):
            yield from _condition(f"{path}.{listed}[{j}]", condition)
    for j, condition in enumerate(retry.fallback_on):
        if condition in retry.on:  # fallback_on would win: the retry could never happen
            message = f"'{condition}' is also in retry.on; list it in one of them"
            yield Problem(f"{path}.fallback_on[{j}]", message)
    backoff = retry.backoff
    if backoff.max < backoff.base:
        message = f"must be at least backoff.base ({backoff.base:g}s), got {backoff.max:g}s"
        yield Problem(f"{path}.backoff.max", message)


def _condition(path: str, condition: str) -> Problems:
    if _STATUS.fullmatch(condition):
        if not 100 <= int(condition) <= 599:
            yield Problem(path, f"status code {condition} is out of range 100-599")
    elif condition == "chunk_gap_timeout":
        yield Problem(
            path,
            "chunk_gap_timeout cannot be retried: it happens after the commit point,"
            " and after the commit point there is never a retry",
        )
    elif condition not in RETRY_CONDITIONS and condition not in GRPC_STATUS_NAMES:
        # Any other word is an upstream JSON error code, so only a near miss of a known
        # condition (or gRPC status name) is flagged; the high cutoff keeps real error codes
        # from looking like typos.
        hint = did_you_mean(condition, RETRY_CONDITIONS + GRPC_STATUS_NAMES, cutoff=0.8)
        if hint:
            yield Problem(path, f"unknown condition '{condition}'{hint}")
