"""Generated gateway configs: one upstream, routes shaped for a scenario, telemetry variants.

Limits are left out (no admission cost beyond the pipeline itself), retries are off (a
benchmark must not hide a failure behind a second try), and the stream timeouts are long
enough for slow and stalled streams to stay open while memory is measured.
"""

from __future__ import annotations

import json

# Telemetry variants compared by the CPU-per-chunk scenario. Metrics are always on.
# Tracing hook: add {"tracing": {"exporter": "console", "sample_ratio": 1.0}} (or an otlp
# exporter with an endpoint on 127.0.0.1) as a variant here to price it the same way.
TELEMETRY: dict[str, dict] = {
    "gateway": {"access_log": "off"},
    "gateway+access_log": {"access_log": "json"},
}

ROUTE_SHAPES = ("paths", "models")
"""How the routing scenario grows the route table: `paths` gives every route its own exact
path (the router indexes paths, so cost should stay flat); `models` puts every route on the
same path prefix with its own `model` glob, so each earlier route is tried in turn."""

_TIMEOUTS = "{connect: 2s, first_chunk: 30s, chunk_gap: 5m, total: 30m, slow_client: 60s}"


def _route(name: str, match: dict) -> str:
    return (
        f"  - name: {name}\n"
        f"    upstream: llm\n"
        f"    match: {json.dumps(match)}\n"
        f"    timeouts: {_TIMEOUTS}\n"
        f"    retry: {{attempts: 1}}\n"
    )


def routes_yaml(count: int = 1, shape: str = "paths") -> str:
    """`count` routes; a request for /v1/chat/completions with model "bench" matches the
    last one, after every earlier route has been considered."""
    routes = []
    for i in range(count - 1):
        if shape == "paths":
            routes.append(_route(f"r{i}", {"path": f"/tenant-{i}/v1/chat/completions"}))
        elif shape == "models":
            routes.append(_route(f"r{i}", {"path_prefix": "/v1/", "model": f"tenant-{i}-*"}))
        else:
            raise ValueError(f"unknown route shape {shape!r}; known: {ROUTE_SHAPES}")
    routes.append(_route("chat", {"path_prefix": "/v1/"}))
    return "routes:\n" + "".join(routes)


def with_websocket_route(routes: str) -> str:
    """`routes` and one more that passes WebSocket sessions on /v1/chat/completions through
    to fake-llm's WebSocket endpoint (only upgrades match it, so its place does not matter)."""
    return routes + _route("ws", {"path": "/v1/chat/completions"}) + (
        "    websocket: {answer_end: finish_reason, idle: 5m}\n"
    )


def gateway_yaml(
    upstream_url: str,
    telemetry: dict | None = None,
    routes: str | None = None,
    grpc_upstream: str | None = None,
) -> str:
    """With `grpc_upstream` (host:port), also a gRPC listener and a route for every call."""
    telemetry = telemetry if telemetry is not None else TELEMETRY["gateway"]
    grpc_listen = ", grpc_listen: 127.0.0.1:0" if grpc_upstream else ""
    return (
        f"server: {{listen: 127.0.0.1:0, shutdown_grace: 1s{grpc_listen}}}\n"
        "admin: {listen: 127.0.0.1:0}\n"
        f"telemetry: {json.dumps(telemetry)}\n"
        "upstreams:\n"
        "  llm:\n"
        "    kind: http\n"
        f'    endpoints: [{{url: "{upstream_url}"}}]\n'
        "    max_connections: 16384\n"
        + (_grpc_upstream(grpc_upstream) if grpc_upstream else "")
        + (routes if routes is not None else routes_yaml())
        + (_route("grpc", {}).replace("upstream: llm", "upstream: grpc-bench\n    grpc: {}")
           if grpc_upstream else "")
    )


def _grpc_upstream(target: str) -> str:
    return (
        "  grpc-bench:\n"
        "    kind: grpc\n"
        f'    endpoints: [{{url: "grpc://{target}"}}]\n'
        "    max_connections: 16384\n"
    )
