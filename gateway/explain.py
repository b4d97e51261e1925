"""`streamgate explain`: a dry run of one request against a config, in words."""

from __future__ import annotations

import json
from types import SimpleNamespace

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.admission.tokens import estimate
from gateway.config.loader import load_config
from gateway.config.model import EjectConfig, GatewayConfig, GrpcUpstream, HttpUpstream
from gateway.config.routes import Route
from gateway.engine.routing import RequestFacts, Router
from gateway.engine.usage_request import asks_for_usage
from gateway.errors import ConfigErrors
from gateway.explain_protocol import protocol_line
from gateway.protocols.http.target import BadTarget, parse_target


def explain(
    config_path: str,
    method: str,
    path: str,
    headers: list[str],
    body: str | None,
    grpc: bool = False,
) -> int:
    try:
        config = load_config(config_path)
    except ConfigErrors as errors:
        for error in errors.errors:
            print(error)
        return 1
    try:
        target = parse_target(path)  # routed as the gateway routes it: normalised
    except BadTarget as exc:
        print(f"request: {method.upper()} {path}")
        print(f"result: the gateway answers 400: {exc.message}")
        return 0
    try:
        facts, stream = _facts(method, target.path, headers, body, "grpc" if grpc else "http")
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    for line in explain_lines(config, facts, stream, body):
        print(line)
    return 0


def _facts(
    method: str, path: str, header_args: list[str], body: str | None, protocol: str = "http"
) -> tuple[RequestFacts, bool]:
    headers: CIMultiDict[str] = CIMultiDict()
    for item in header_args:
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"--header {item!r} is not NAME:VALUE")
        headers.add(name.strip(), value.strip())
    payload = None
    if body is not None:
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise ValueError(f"--body is not valid JSON: {exc}") from None
    model = payload.get("model") if isinstance(payload, dict) else None
    stream = (isinstance(payload, dict) and payload.get("stream") is True) or (
        "text/event-stream" in headers.get("accept", "")
    )
    facts = RequestFacts(
        method.upper(),
        path.split("?", 1)[0],
        CIMultiDictProxy(headers),
        model if isinstance(model, str) else None,
        protocol,
    )
    return facts, stream


def explain_lines(
    config: GatewayConfig, facts: RequestFacts, stream: bool, body: str | None = None
) -> list[str]:
    router = Router(config.routes)
    said = "gRPC call" if facts.protocol == "grpc" else f"{facts.method}"
    lines = [f"request: {said} {facts.path}" + (f" model={facts.model!r}" if facts.model else "")]
    chosen: Route | None = None
    for compiled in router.compiled:
        why_not = compiled.mismatch(facts)
        label = f"routes[{compiled.index}] {compiled.route.name!r}"
        if why_not is None:
            lines.append(f"  {label}: matches")
            chosen = compiled.route
            break
        lines.append(f"  {label}: no, {why_not}")
    if chosen is None:
        lines.append("result: no route matches: the gateway answers 404")
        return lines
    lines.append(f"route: {chosen.name}")
    # A session, and an answer bridged from a WebSocket to SSE, are charged as streams.
    stream = stream or chosen.websocket is not None or chosen.websocket_upstream is not None
    kind = "websocket session (charged as a stream)" if chosen.websocket else None
    if chosen.grpc is not None:
        stream = chosen.grpc.stream
        kind = f"gRPC call (charged as {'a stream' if stream else 'unary'}, per grpc.stream)"
    elif chosen.grpc_bridge is not None:
        stream, kind = True, "HTTP bridged to a gRPC method (an event stream)"
    lines.append(f"kind: {kind or ('stream' if stream else 'unary')}")
    lines.extend(_limit_lines(config, chosen, stream, body, facts.path))
    lines.extend(_upstream_lines(config, chosen))
    lines.extend(_policy_lines(chosen))
    lines.extend(_rescue_lines(config, chosen))
    return lines


def _rescue_lines(config: GatewayConfig, route: Route) -> list[str]:
    hedge, resume = route.hedge, route.resume
    if hedge is None:
        lines = ["hedge: off (a slow first chunk waits for first_chunk, then falls back)"]
    else:
        lines = [
            f"hedge: after {hedge.after:g}s with no content, the next try (another endpoint, "
            f"else the next fallback) starts beside it; up to {hedge.max_extra} per request, "
            f"within {hedge.budget_percent}% of the route's requests of the last 10s; the "
            "first with content wins, the others are closed; admission charges the request once"
        ]
    if resume is None:
        lines.append("resume: off (a stream that breaks after its first content ends visibly)")
        return lines
    hops = [route.upstream] + [f.upstream for f in route.fallbacks]
    dialects = ", ".join(f"{name} {config.upstreams[name].prefill}" for name in hops)
    lines.append(
        f"resume: SSE chat completions broken by [{', '.join(resume.on)}], up to {resume.max} "
        f"per request, on the next try (another endpoint, else the next fallback, else the same "
        f"endpoint while retry.attempts allows); text kept "
        f"up to {resume.max_prefix_bytes} bytes; prefill by upstream: {dialects} (none, or "
        "refused: asked again and spliced only if it begins with the text sent, else an error "
        "event)"
    )
    return lines


def _limit_lines(
    config: GatewayConfig, route: Route, stream: bool, body: str | None, path: str
) -> list[str]:
    if not route.limits:
        return ["limits: none"]
    lines = ["limits (rate limits, then token budgets, then concurrency, each in route order):"]
    for name in route.limits:
        if name in config.limits.rate:
            r = config.limits.rate[name]
            scope = _scope(r.scope, config)
            lines.append(f"  {name}: rate {r.rate:g} per {r.per:g}s keyed by {r.key} ({scope})")
    lines.extend(_budget_lines(config, route, body, path))
    for name in route.limits:
        if name in config.limits.concurrency:
            c = config.limits.concurrency[name]
            weight = c.weights.stream if stream else c.weights.unary
            lines.append(
                f"  {name}: concurrency, weight {weight} of {c.capacity} units, "
                f"queue up to {c.max_queue} requests ({_scope(c.scope, config)})"
            )
    return lines


def _scope(scope: str, config: GatewayConfig) -> str:
    workers = config.server.workers
    if scope == "global" or workers == 1:
        return scope
    return f"local, split across {workers} serving processes: each has its share"


def _budget_lines(
    config: GatewayConfig, route: Route, body: str | None, route_path: str
) -> list[str]:
    raw = (body or "").encode()
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = None
    request = SimpleNamespace(json=payload if isinstance(payload, dict) else None, body=raw)
    lines = []
    for name in route.limits:
        if (b := config.limits.tokens.get(name)) is not None:
            prompt, completion = estimate(request, b)
            reserve = min(prompt + completion, b.tokens)
            cap = b.max_tokens_per_stream
            lines.append(
                f"  {name}: tokens {b.tokens} per {b.per:g}s keyed by {b.key} "
                f"({_scope(b.scope, config)}); "
                f"reserves {reserve} (prompt ~{prompt} + completion {completion}, capped at the "
                "budget), settled to the upstream's usage when the request ends"
                + ("" if cap is None else f"; a stream is ended past {cap} completion tokens "
                   "(max_tokens_per_stream)")
            )
    if lines and asks_for_usage(route_path, request.json):
        lines.append(
            "  the client did not ask for stream usage: the gateway asks the upstream for usage "
            "(stream_options.include_usage) and does not relay the usage-only event"
        )
    return lines


def _upstream_lines(config: GatewayConfig, route: Route) -> list[str]:
    hops = [(route.upstream, None)] + [(f.upstream, f.model) for f in route.fallbacks]
    lines = ["upstreams, in order:"]
    for i, (name, model) in enumerate(hops, 1):
        upstream = config.upstreams[name]
        rewrite = f", model rewritten to {model!r}" if model else ""
        if isinstance(upstream, HttpUpstream | GrpcUpstream):
            endpoints = ", ".join(f"{e.url} (weight {e.weight})" for e in upstream.endpoints)
            said = f"{upstream.kind}, {upstream.balance} over {endpoints}{rewrite}"
            lines.append(f"  {i}. {name}: {said}")
        else:
            workers = len(upstream.gpus) if upstream.gpus is not None else upstream.count
            lines.append(f"  {i}. {name}: worker pool of {workers}, {upstream.balance}{rewrite}")
        lines.append("     " + _capacity_line(upstream.max_connections, route))
        lines.append("     " + _eject_line(upstream.eject))
    return lines


def _capacity_line(max_connections: int, route: Route) -> str:
    return (
        f"at most {max_connections} requests in flight to it; a try waits up to "
        f"timeouts.queue {route.timeouts.queue:g}s for one, then fails as pool_exhausted (503)"
    )


def _eject_line(eject: EjectConfig) -> str:
    return (
        f"eject after {eject.consecutive_failures} failures in a row (per endpoint and model) "
        f"for {eject.cooldown:g}s growing to {eject.max_cooldown:g}s, at most "
        f"{eject.max_ejected_percent}% of endpoints at once; panic below "
        f"{eject.panic_threshold}% in rotation"
    )


def _policy_lines(route: Route) -> list[str]:
    t, r, b = route.timeouts, route.retry, route.retry.backoff
    return [
        f"timeouts: queue {t.queue:g}s, connect {t.connect:g}s, first_chunk {t.first_chunk:g}s, "
        f"chunk_gap {t.chunk_gap:g}s, total {t.total:g}s, slow_client {t.slow_client:g}s",
        f"retry: up to {r.attempts} tries per upstream on [{', '.join(r.on)}]; "
        f"straight to the next fallback on [{', '.join(r.fallback_on)}]; "
        f"backoff {b.base:g}s doubling to {b.max:g}s{' with jitter' if b.jitter else ''}; "
        "never after the first content chunk",
        f"buffer: {route.buffer.chunks} chunks / {route.buffer.bytes} bytes"
        + (f"; SSE keepalive every {route.keepalive:g}s of silence" if route.keepalive else ""),
        protocol_line(route),
    ]
