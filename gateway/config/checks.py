"""Cross-field checks on a parsed config: the rules that field types alone cannot state.

Checks run on the finished `GatewayConfig` and yield `Problem`s that name the dotted path of
the offending value; `config_loader` turns paths into file positions, so nothing here sees
YAML. They run only once the file converted cleanly: on a half-built config they would
report phantom errors (a route pointing at an upstream that merely failed to parse).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Collection, Iterator, Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

from gateway.config.model import (
    EjectConfig,
    GatewayConfig,
    HealthConfig,
    HttpUpstream,
    RetryPolicy,
    Route,
    RouteMatch,
    WorkerPoolUpstream,
)

RETRY_CONDITIONS = ("connect_error", "reset", "empty_body", "first_chunk_timeout", "pool_exhausted")
"""Retry conditions with a fixed meaning; other words in retry lists are upstream error codes."""
RATE_KEYS = ("route", "client_ip")
_STATUS = re.compile(r"[-+]?\d+")


class Problem(NamedTuple):
    path: str
    message: str
    at_key: bool = False
    """Position at the key rather than the value (the name itself is what is wrong)."""


Problems = Iterator[Problem]


def did_you_mean(word: str, choices: Collection[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check(cfg: GatewayConfig) -> list[Problem]:
    return [
        *_server(cfg),
        *_telemetry(cfg),
        *_upstreams(cfg),
        *_limits(cfg),
        *_routes(cfg),
    ]


# ----------------------------------------------------------------- small rules


def _at_least(path: str, value: int, minimum: int) -> Problems:
    if value < minimum:
        yield Problem(path, f"must be at least {minimum}, got {value}")


def _positive(path: str, value: float, unit: str = "") -> Problems:
    if value <= 0:
        yield Problem(path, f"must be greater than 0, got {value:g}{unit}")


def _absolute_path(path: str, value: str | None) -> Problems:
    if value is not None and not value.startswith("/"):
        yield Problem(path, f"must start with '/', got '{value}'")


def _known(path: str, name: str, what: str, names: Collection[str]) -> Problems:
    if name not in names:
        yield Problem(path, f"unknown {what} '{name}'{did_you_mean(name, names)}")


# ----------------------------------------------------------------- top-level sections


def _server(cfg: GatewayConfig) -> Problems:
    yield from _at_least("server.max_request_body", cfg.server.max_request_body, 1)
    yield from _at_least("server.max_header_bytes", cfg.server.max_header_bytes, 1024)
    for name in ("header_timeout", "idle_timeout", "body_timeout"):
        yield from _positive(f"server.{name}", getattr(cfg.server, name), "s")
    yield from _positive("state.lease_ttl", cfg.state.lease_ttl, "s")


def _telemetry(cfg: GatewayConfig) -> Problems:
    tracing = cfg.telemetry.tracing
    if not 0.0 <= tracing.sample_ratio <= 1.0:
        path = "telemetry.tracing.sample_ratio"
        yield Problem(path, f"must be between 0 and 1, got {tracing.sample_ratio:g}")
    if tracing.exporter == "otlp" and not tracing.endpoint:
        yield Problem("telemetry.tracing.exporter", "exporter otlp needs an endpoint")


# ----------------------------------------------------------------- upstreams


def _upstreams(cfg: GatewayConfig) -> Problems:
    if not cfg.upstreams:
        yield Problem("upstreams", "define at least one upstream")
    for name, upstream in cfg.upstreams.items():
        path = f"upstreams.{name}"
        yield from _UPSTREAM_CHECKS[type(upstream)](path, upstream)
        yield from _at_least(f"{path}.max_connections", upstream.max_connections, 1)
        yield from _eject(f"{path}.eject", upstream.eject)


def _eject(path: str, eject: EjectConfig) -> Problems:
    yield from _at_least(f"{path}.consecutive_failures", eject.consecutive_failures, 1)
    yield from _positive(f"{path}.cooldown", eject.cooldown, "s")
    if eject.max_cooldown < eject.cooldown:
        message = f"must be at least cooldown ({eject.cooldown:g}s), got {eject.max_cooldown:g}s"
        yield Problem(f"{path}.max_cooldown", message)
    for name in ("max_ejected_percent", "panic_threshold"):
        value = getattr(eject, name)
        if not 0 <= value <= 100:
            yield Problem(f"{path}.{name}", f"must be a percentage 0-100, got {value}")


def _http(path: str, upstream: HttpUpstream) -> Problems:
    if not upstream.endpoints:
        yield Problem(f"{path}.endpoints", "list at least one endpoint")
    for i, endpoint in enumerate(upstream.endpoints):
        yield from _url(f"{path}.endpoints[{i}].url", endpoint.url)
        yield from _at_least(f"{path}.endpoints[{i}].weight", endpoint.weight, 1)
    if upstream.health is not None:
        yield from _health(f"{path}.health", upstream.health)


def _url(path: str, url: str) -> Problems:
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 -- raises ValueError on a port out of range
    except ValueError:
        valid = False
    if not valid:
        yield Problem(path, f"invalid url '{url}' (use http:// or https:// and a host)")


def _health(path: str, health: HealthConfig) -> Problems:
    yield from _absolute_path(f"{path}.path", health.path)
    yield from _positive(f"{path}.interval", health.interval, "s")
    yield from _positive(f"{path}.timeout", health.timeout, "s")
    yield from _at_least(f"{path}.unhealthy_after", health.unhealthy_after, 1)


def _worker_pool(path: str, pool: WorkerPoolUpstream) -> Problems:
    yield from _worker_count(path, pool)
    if not pool.command:
        yield Problem(f"{path}.command", "must not be empty")
    elif not any("{port}" in arg for arg in pool.command):
        yield Problem(f"{path}.command", "must contain {port} (each worker gets its own port)")
    if pool.port_base is not None and not 1 <= pool.port_base <= 65535:
        yield Problem(f"{path}.port_base", f"must be a port 1-65535, got {pool.port_base}")
    yield from _absolute_path(f"{path}.ready.path", pool.ready.path)
    yield from _positive(f"{path}.ready.timeout", pool.ready.timeout, "s")
    yield from _positive(f"{path}.ready.interval", pool.ready.interval, "s")
    yield from _positive(f"{path}.restart.backoff", pool.restart.backoff, "s")
    if pool.restart.max_backoff < pool.restart.backoff:
        yield Problem(f"{path}.restart.max_backoff", "must be at least restart.backoff")
    if pool.gpus is None and any("{gpu}" in arg for arg in pool.command):
        yield Problem(f"{path}.command", "uses {gpu}, which only 'gpus:' pools have")


def _worker_count(path: str, pool: WorkerPoolUpstream) -> Problems:
    if pool.gpus is None and pool.count is None:
        yield Problem(path, "set one of 'gpus' or 'count'")
    elif pool.gpus is not None and pool.count is not None:
        yield Problem(f"{path}.count", "set either 'gpus' or 'count', not both")
    elif pool.gpus is not None and not pool.gpus:
        yield Problem(f"{path}.gpus", "must not be empty")
    elif pool.count is not None:
        yield from _at_least(f"{path}.count", pool.count, 1)


_UPSTREAM_CHECKS = {HttpUpstream: _http, WorkerPoolUpstream: _worker_pool}


# ----------------------------------------------------------------- limits


def _limits(cfg: GatewayConfig) -> Problems:
    limits = cfg.limits
    for name in limits.rate:
        if name in limits.concurrency:
            message = f"limit '{name}' is also defined in limits.concurrency (names must be unique)"
            yield Problem(f"limits.rate.{name}", message, at_key=True)
    for name, limit in limits.concurrency.items():
        path = f"limits.concurrency.{name}"
        yield from _at_least(f"{path}.capacity", limit.capacity, 1)
        for kind in ("stream", "unary"):
            weight = getattr(limit.weights, kind)
            yield from _weight(f"{path}.weights.{kind}", weight, limit.capacity)
        yield from _at_least(f"{path}.max_queue", limit.max_queue, 0)
        yield from _scope(f"{path}.scope", limit.scope, cfg)
    for name, limit in limits.rate.items():
        path = f"limits.rate.{name}"
        yield from _positive(f"{path}.rate", limit.rate)
        yield from _positive(f"{path}.per", limit.per, "s")
        yield from _rate_key(f"{path}.key", limit.key)
        yield from _scope(f"{path}.scope", limit.scope, cfg)
        yield from _at_least(f"{path}.max_keys", limit.max_keys, 1)


def _weight(path: str, weight: int, capacity: int) -> Problems:
    yield from _at_least(path, weight, 1)
    if capacity >= 1 and weight > capacity:
        message = f"weight {weight} is larger than capacity {capacity} (it could never be admitted)"
        yield Problem(path, message)


def _scope(path: str, scope: str, cfg: GatewayConfig) -> Problems:
    if scope == "global" and cfg.state.backend != "redis":
        yield Problem(path, "scope global needs state.backend: redis (memory state is per replica)")


def _rate_key(path: str, key: str) -> Problems:
    if key in RATE_KEYS or (key.startswith("header:") and key[len("header:") :].strip()):
        return
    hint = did_you_mean(key, RATE_KEYS) or " (use route, client_ip or header:NAME)"
    yield Problem(path, f"invalid key '{key}'{hint}")


# ----------------------------------------------------------------- routes


def _routes(cfg: GatewayConfig) -> Problems:
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
    yield from _known(f"{path}.upstream", route.upstream, "upstream", cfg.upstreams)
    for j, fallback in enumerate(route.fallbacks):
        upstream_path = f"{path}.fallbacks[{j}].upstream"
        yield from _known(upstream_path, fallback.upstream, "upstream", cfg.upstreams)
    yield from _route_limits(path, route, {**cfg.limits.rate, **cfg.limits.concurrency})
    yield from _match(f"{path}.match", route.match)
    for field in dataclasses.fields(route.timeouts):
        value = getattr(route.timeouts, field.name)
        yield from _positive(f"{path}.timeouts.{field.name}", value, "s")
    yield from _retry(f"{path}.retry", route.retry)
    yield from _at_least(f"{path}.buffer.chunks", route.buffer.chunks, 1)
    yield from _at_least(f"{path}.buffer.bytes", route.buffer.bytes, 1)
    if route.keepalive is not None:
        yield from _positive(f"{path}.keepalive", route.keepalive, "s")
    if route.framing.require_footer and route.framing.kind != "truss":
        message = f"only a truss framing has a footer (this route's is {route.framing.kind})"
        yield Problem(f"{path}.framing.require_footer", message)


def _route_limits(path: str, route: Route, limits: Mapping[str, object]) -> Problems:
    for k, name in enumerate(route.limits):
        if name in route.limits[:k]:
            yield Problem(f"{path}.limits[{k}]", f"limit '{name}' is listed twice")
        else:
            yield from _known(f"{path}.limits[{k}]", name, "limit", limits)


def _match(path: str, match: RouteMatch) -> Problems:
    if match.path is not None and match.path_prefix is not None:
        yield Problem(f"{path}.path_prefix", "set either path or path_prefix, not both")
    yield from _absolute_path(f"{path}.path", match.path)
    yield from _absolute_path(f"{path}.path_prefix", match.path_prefix)
    if match.methods == ():
        yield Problem(f"{path}.methods", "must not be empty (leave it out to match any method)")


def _retry(path: str, retry: RetryPolicy) -> Problems:
    yield from _at_least(f"{path}.attempts", retry.attempts, 1)
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
    elif condition not in RETRY_CONDITIONS:
        # Any other word is an upstream JSON error code, so only a near miss of a known
        # condition is flagged; the high cutoff keeps real error codes from looking like typos.
        hint = did_you_mean(condition, RETRY_CONDITIONS, cutoff=0.8)
        if hint:
            yield Problem(path, f"unknown condition '{condition}'{hint}")
