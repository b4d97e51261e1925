"""The admin listener: /metrics /healthz /readyz /admin/config /admin/reload /admin/streams."""

from __future__ import annotations

import asyncio
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.config.redact import redacted_config
from gateway.engine.runtime import Runtime
from gateway.observe.metrics import Metrics
from gateway.protocols.http.headers import SERVER


class Gateway(Protocol):
    """What the admin listener reads of the running gateway (app.Gateway)."""

    metrics: Metrics
    runtime: Runtime
    draining: bool

    async def reload(self) -> list[str]: ...


GATEWAY = web.AppKey("gateway", Gateway)


def admin_app(gateway: Gateway) -> web.Application:
    app = web.Application()
    app[GATEWAY] = gateway
    app.on_response_prepare.append(server_header)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/config", config)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/streams", streams)
    return app


async def server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[SERVER[0]] = SERVER[1]  # not aiohttp's, which names its version


async def metrics(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    body = generate_latest(gateway.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"alive": True})


async def readyz(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    reasons = []
    if gateway.draining:
        reasons.append("draining")
    runtime = gateway.runtime
    if not any(pool.serving() for pool in runtime.pools.values()):
        reasons.append("no upstream has an endpoint in rotation")
    ready = not reasons
    # Panic is reported, not unready: the pool still serves, across all its endpoints.
    for pool in runtime.pools.values():
        reasons.extend(pool.panic_reasons())
    # Workers out of rotation are reported, but do not by themselves make the gateway unready
    # while some upstream still serves: a crash loop is visible here, not silent.
    for supervisor in runtime.supervisors.values():
        reasons.extend(supervisor.status())
    # Redis down is reported, but leaves the pod ready under either `on_error`: every replica
    # shares the same Redis, so taking pods out of rotation cannot route around the outage; it
    # would only stop the routes that use no global limit too.
    state = runtime.admission.shared_state
    if state is not None and not state.up:
        reasons.append(
            f"shared state degraded: redis at {state.where} is unreachable "
            f"(state.on_error: {state.config.on_error})"
        )
    return web.json_response({"ready": ready, "reasons": reasons}, status=200 if ready else 503)


async def config(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    return web.json_response(redacted_config(gateway.runtime.config))


async def reload(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    errors = await gateway.reload()
    if errors:
        return web.json_response({"result": "error", "errors": errors}, status=400)
    return web.json_response({"result": "ok"})


async def streams(request: web.Request) -> web.Response:
    gateway: Gateway = request.app[GATEWAY]
    now = asyncio.get_running_loop().time()
    listing = [
        {
            "id": ctx.request_id,
            "route": ctx.route_name,
            "upstream": ctx.upstream,
            "endpoint": ctx.endpoint,
            "age_s": round(now - ctx.started, 3),
            "chunks": ctx.chunks,
            "bytes": ctx.bytes,
            "buffered_chunks": ctx.buffered_chunks,
            "protocol": ctx.protocol,
            "messages_in": ctx.messages_in,
        }
        for ctx in list(gateway.runtime.streams)
    ]
    return web.json_response({"streams": listing})
