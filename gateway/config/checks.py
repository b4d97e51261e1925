"""Cross-field checks on a parsed config: the rules that field types alone cannot state.

Checks run on the finished `GatewayConfig` and yield `Problem`s that name the dotted path of
the offending value; `config_loader` turns paths into file positions, so nothing here sees
YAML. They run only once the file converted cleanly: on a half-built config they would
report phantom errors (a route pointing at an upstream that merely failed to parse).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from gateway.config.grpc_checks import check_grpc_upstream
from gateway.config.model import (
    EjectConfig,
    GatewayConfig,
    GrpcUpstream,
    HealthConfig,
    HttpUpstream,
    WorkerPoolUpstream,
)
from gateway.config.processes import check_processes
from gateway.config.redis_url import BadRedisUrl, parse_redis_url
from gateway.config.route_checks import check_routes
from gateway.config.rules import (
    Problem,
    Problems,
    absolute_path,
    at_least,
    did_you_mean,
    positive,
)

RATE_KEYS = ("route", "client_ip")


def check(cfg: GatewayConfig) -> list[Problem]:
    return [
        *_server(cfg),
        *_telemetry(cfg),
        *_upstreams(cfg),
        *_limits(cfg),
        *check_routes(cfg),
        *check_processes(cfg),
    ]


# ----------------------------------------------------------------- top-level sections


def _server(cfg: GatewayConfig) -> Problems:
    yield from at_least("server.max_request_body", cfg.server.max_request_body, 1)
    yield from at_least("server.max_header_bytes", cfg.server.max_header_bytes, 1024)
    for name in ("header_timeout", "idle_timeout", "body_timeout"):
        yield from positive(f"server.{name}", getattr(cfg.server, name), "s")
    yield from positive("state.lease_ttl", cfg.state.lease_ttl, "s")
    yield from _redis_url(cfg.state.redis_url)


def _redis_url(url: str) -> Problems:
    # Only what is written as a URL is judged here: a value without a scheme has always been
    # left to the Redis client at start-up (deploy tests fill secrets with placeholders).
    if "://" not in url:
        return
    try:
        parse_redis_url(url)
    except BadRedisUrl as exc:
        yield Problem("state.redis_url", str(exc))


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
        key = "metadata" if isinstance(upstream, GrpcUpstream) else "headers"
        yield from _added_headers(f"{path}.{key}", upstream.headers)
        yield from at_least(f"{path}.max_connections", upstream.max_connections, 1)
        yield from _eject(f"{path}.eject", upstream.eject)


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _added_headers(path: str, headers: Mapping[str, str]) -> Problems:
    """Headers sent to an upstream with every request: a bad name, or a line break that would
    split the request, is refused here rather than failing every request (values are not
    echoed: they are often secrets)."""
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            yield Problem(f"{path}.{name}", "not a valid header name")
        elif any(c in value for c in "\r\n\0"):
            yield Problem(f"{path}.{name}", "a header value may not hold a line break or NUL")


def _eject(path: str, eject: EjectConfig) -> Problems:
    yield from at_least(f"{path}.consecutive_failures", eject.consecutive_failures, 1)
    yield from positive(f"{path}.cooldown", eject.cooldown, "s")
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
        yield from at_least(f"{path}.endpoints[{i}].weight", endpoint.weight, 1)
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
        message = f"invalid url '{url}' (use http://, https://, ws:// or wss:// and a host)"
        yield Problem(path, message)


def _health(path: str, health: HealthConfig) -> Problems:
    yield from absolute_path(f"{path}.path", health.path)
    yield from positive(f"{path}.interval", health.interval, "s")
    yield from positive(f"{path}.timeout", health.timeout, "s")
    yield from at_least(f"{path}.unhealthy_after", health.unhealthy_after, 1)


def _worker_pool(path: str, pool: WorkerPoolUpstream) -> Problems:
    yield from _worker_count(path, pool)
    if not pool.command:
        yield Problem(f"{path}.command", "must not be empty")
    elif not any("{port}" in arg for arg in pool.command):
        yield Problem(f"{path}.command", "must contain {port} (each worker gets its own port)")
    if pool.port_base is not None and not 1 <= pool.port_base <= 65535:
        yield Problem(f"{path}.port_base", f"must be a port 1-65535, got {pool.port_base}")
    yield from absolute_path(f"{path}.ready.path", pool.ready.path)
    yield from positive(f"{path}.ready.timeout", pool.ready.timeout, "s")
    yield from positive(f"{path}.ready.interval", pool.ready.interval, "s")
    yield from positive(f"{path}.restart.backoff", pool.restart.backoff, "s")
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
        yield from at_least(f"{path}.count", pool.count, 1)


_UPSTREAM_CHECKS = {
    HttpUpstream: _http,
    WorkerPoolUpstream: _worker_pool,
    GrpcUpstream: check_grpc_upstream,
}


# ----------------------------------------------------------------- limits


def _limits(cfg: GatewayConfig) -> Problems:
    limits = cfg.limits
    for name in limits.rate:
        if name in limits.concurrency:
            message = f"limit '{name}' is also defined in limits.concurrency (names must be unique)"
            yield Problem(f"limits.rate.{name}", message, at_key=True)
    for name in limits.tokens:
        for kind in ("rate", "concurrency"):
            if name in getattr(limits, kind):
                message = f"limit '{name}' is also defined in limits.{kind} (names must be unique)"
                yield Problem(f"limits.tokens.{name}", message, at_key=True)
    for name, limit in limits.concurrency.items():
        path = f"limits.concurrency.{name}"
        yield from at_least(f"{path}.capacity", limit.capacity, 1)
        for kind in ("stream", "unary"):
            weight = getattr(limit.weights, kind)
            yield from _weight(f"{path}.weights.{kind}", weight, limit.capacity)
        yield from at_least(f"{path}.max_queue", limit.max_queue, 0)
        yield from _scope(f"{path}.scope", limit.scope, cfg)
    for name, limit in limits.rate.items():
        path = f"limits.rate.{name}"
        yield from positive(f"{path}.rate", limit.rate)
        yield from positive(f"{path}.per", limit.per, "s")
        yield from _rate_key(f"{path}.key", limit.key)
        yield from _scope(f"{path}.scope", limit.scope, cfg)
        yield from at_least(f"{path}.max_keys", limit.max_keys, 1)
    for name, budget in limits.tokens.items():
        path = f"limits.tokens.{name}"
        yield from at_least(f"{path}.tokens", budget.tokens, 1)
        yield from positive(f"{path}.per", budget.per, "s")
        yield from _rate_key(f"{path}.key", budget.key)
        yield from _scope(f"{path}.scope", budget.scope, cfg)
        yield from at_least(f"{path}.default_max_tokens", budget.default_max_tokens, 0)
        yield from at_least(f"{path}.bytes_per_token", budget.bytes_per_token, 1)
        yield from at_least(f"{path}.max_keys", budget.max_keys, 1)
        if budget.max_tokens_per_stream is not None:
            yield from at_least(f"{path}.max_tokens_per_stream", budget.max_tokens_per_stream, 1)


def _weight(path: str, weight: int, capacity: int) -> Problems:
    yield from at_least(path, weight, 1)
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
