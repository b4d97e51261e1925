"""Checks on routes: their upstreams and limits exist, their match and retry policy hold."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from gateway.config.grpc_checks import check_grpc_route
from gateway.config.grpc_status import GRPC_STATUS_NAMES
from gateway.config.model import GatewayConfig
from gateway.config.routes import RESUME_CONDITIONS, AnswerEnd, RetryPolicy, Route, RouteMatch
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
    if route.websocket_upstream is not None:
        yield from _websocket_upstream(path, route)
    if route.hedge is not None:
        yield from _hedge(f"{path}.hedge", route)
    if route.resume is not None:
        yield from _resume(f"{path}.resume", route)
    yield from check_grpc_route(path, route, cfg)


def _hedge(path: str, route: Route) -> Problems:
    hedge = route.hedge
    yield from positive(f"{path}.after", hedge.after, "s")
    yield from at_least(f"{path}.max_extra", hedge.max_extra, 1)
    if not 0 <= hedge.budget_percent <= 100:
        yield Problem(f"{path}.budget_percent", "must be a percentage 0-100")
    if route.websocket is not None:
        yield Problem(path, "hedging races request/answer streams, not websocket sessions")


def _resume(path: str, route: Route) -> Problems:
    resume = route.resume
    known_ones = ", ".join(RESUME_CONDITIONS)
    for j, condition in enumerate(resume.on):
        if condition not in RESUME_CONDITIONS:
            hint = did_you_mean(condition, RESUME_CONDITIONS)
            message = f"unknown condition '{condition}'{hint}; known: {known_ones}"
            yield Problem(f"{path}.on[{j}]", message)
    yield from at_least(f"{path}.max", resume.max, 1)
    yield from at_least(f"{path}.max_prefix_bytes", resume.max_prefix_bytes, 1)
    if route.websocket is not None:
        yield Problem(path, "resume continues SSE chat completions, not websocket sessions")
    elif route.grpc is not None or route.grpc_bridge is not None:
        yield Problem(path, "resume continues SSE chat completions from HTTP upstreams, not gRPC")
    elif route.framing.kind not in ("auto", "sse"):
        kind = route.framing.kind
        yield Problem(path, f"resume continues SSE chat completions, not framing {kind}")


def _websocket(path: str, route: Route) -> Problems:
    ws = route.websocket
    yield from at_least(f"{path}.websocket.max_message_size", ws.max_message_size, 1)
    yield from positive(f"{path}.websocket.idle", ws.idle, "s")
    yield from at_least(f"{path}.websocket.replay_buffer", ws.replay_buffer, 1)
    if ws.answer_end is not None:
        yield from _answer_end(f"{path}.websocket.answer_end", ws.answer_end)
    if route.match.model is not None:
        # A session is routed on its upgrade request, which has no body to read a model from.
        message = "a websocket route is chosen before any message arrives: no model to match"
        yield Problem(f"{path}.match.model", message)


def _websocket_upstream(path: str, route: Route) -> Problems:
    bridge = route.websocket_upstream
    if route.websocket is not None:
        message = "a websocket route relays or bridges its sessions itself; drop one of the two"
        yield Problem(f"{path}.websocket_upstream", message, at_key=True)
    yield from at_least(
        f"{path}.websocket_upstream.max_message_size", bridge.max_message_size, 1
    )
    yield from _answer_end(f"{path}.websocket_upstream.answer_end", bridge.answer_end)


def _answer_end(path: str, end: AnswerEnd) -> Problems:
    if end.kind == "match" and not end.match:
        yield Problem(f"{path}.match", "name at least one field the end message has")
    if end.kind == "finish_reason" and end.match:
        yield Problem(f"{path}.match", "only with kind: match (finish_reason matches on its own)")


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
