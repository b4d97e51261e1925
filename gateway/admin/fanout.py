"""The supervisor's admin listener: one place that answers for every serving process.

Each serving process has a private admin listener (127.0.0.1, a port the supervisor chose);
the supervisor's, on `admin.listen`, asks them all at once and answers as one gateway would:

    /metrics         their expositions merged into one (observe/merge.py)
    /readyz          ready when not draining and every process is in rotation and ready;
                     reasons name the process (`process 1 (pid 4242): ...`)
    /admin/streams   every process's streams, each with its `process` index and `pid`
    /admin/processes the serving processes: index, pid, state, restarts in a row
    /admin/reload    the supervisor's reload (validated once, then every process)
    /admin/config    the supervisor's config (the whole one, not a process's share)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, NamedTuple, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.admin.server import GATEWAY, healthz, reload, server_header
from gateway.config.model import GatewayConfig
from gateway.config.redact import redacted_config
from gateway.observe.merge import MergedMetrics
from gateway.observe.metrics import Metrics

ASK_TIMEOUT_S = 2.0
"""A serving process's admin listener answers in milliseconds; past this it is reported."""


class Process(NamedTuple):
    index: int
    pid: int | None
    admin_url: str
    state: str
    """`ready` while in rotation; else starting, failing, backoff or stopped."""
    failures: int
    """Failures in a row (exits, failed health probes) behind its current state."""
    alive: bool
    """Its process is running (ready or not: starting, or draining)."""


class Supervisor(Protocol):
    """What the admin listener reads of the supervisor (processes/supervisor.py)."""

    metrics: Metrics
    config: GatewayConfig
    draining: bool

    def processes(self) -> list[Process]: ...
    def status(self) -> list[str]:
        """One line per serving process out of rotation, saying why."""
    def pools_status(self) -> list[str]:
        """One line per worker (of the pools it runs) out of rotation, saying why."""
    async def reload(self) -> list[str]: ...


SUPERVISOR = web.AppKey("supervisor", Supervisor)
SUPERVISOR_SESSION = web.AppKey("supervisor_session", aiohttp.ClientSession)
MERGED = web.AppKey("merged", MergedMetrics)


def fanout_app(supervisor: Supervisor) -> web.Application:
    app = web.Application()
    app[SUPERVISOR] = supervisor
    app[GATEWAY] = supervisor  # type: ignore[misc] -- for admin/server.py's `reload`, all it reads
    app[MERGED] = MergedMetrics()
    app.cleanup_ctx.append(_session)
    app.on_response_prepare.append(server_header)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/admin/config", config)
    app.router.add_post("/admin/reload", reload)
    app.router.add_get("/admin/streams", streams)
    app.router.add_get("/admin/processes", processes)
    return app


async def _session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        app[SUPERVISOR_SESSION] = session
        yield


async def _ask_all(
    request: web.Request, path: str, json: bool = True, only_ready: bool = False
) -> dict[Process, Any]:
    """Each running process's answer to GET `path` (JSON, or text), or the exception; with
    `only_ready`, only those in rotation (one starting is reported as such by the supervisor)."""
    session = request.app[SUPERVISOR_SESSION]
    serving = [
        p
        for p in request.app[SUPERVISOR].processes()
        if p.alive and (p.state == "ready" or not only_ready)
    ]

    async def ask(process: Process) -> Any:
        async with session.get(process.admin_url + path) as response:
            return await (response.json() if json else response.text())

    answers = await asyncio.gather(*(ask(p) for p in serving), return_exceptions=True)
    return dict(zip(serving, answers, strict=True))


def _name(process: Process) -> str:
    return f"process {process.index} (pid {process.pid})"


async def metrics(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    answers = await _ask_all(request, "/metrics", json=False)
    scrapes = {p.index: (p.pid or 0, text) for p, text in answers.items() if isinstance(text, str)}
    limits = supervisor.config.limits
    shared = {n for n, limit in limits.concurrency.items() if limit.scope == "global"}
    own = generate_latest(supervisor.metrics.registry).decode()
    body = request.app[MERGED].merge(scrapes, own, shared)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def readyz(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    reasons = ["draining"] if supervisor.draining else []
    reasons += supervisor.status()
    ready = not reasons
    # Workers out of rotation are reported without making it unready by themselves, as in
    # one gateway: the processes say whether some upstream still serves.
    reasons += supervisor.pools_status()
    for process, answer in (await _ask_all(request, "/readyz", only_ready=True)).items():
        if isinstance(answer, BaseException):
            ready = False
            reasons.append(f"{_name(process)}: its admin listener did not answer ({answer!r})")
            continue
        ready = ready and bool(answer.get("ready"))
        reasons.extend(f"{_name(process)}: {reason}" for reason in answer.get("reasons", ()))
    return web.json_response({"ready": ready, "reasons": reasons}, status=200 if ready else 503)


async def config(request: web.Request) -> web.Response:
    return web.json_response(redacted_config(request.app[SUPERVISOR].config))


async def streams(request: web.Request) -> web.Response:
    listing = []
    for process, answer in (await _ask_all(request, "/admin/streams")).items():
        with contextlib.suppress(AttributeError, TypeError):
            for stream in answer.get("streams", ()):
                listing.append({**stream, "process": process.index, "pid": process.pid})
    return web.json_response({"streams": listing})


async def processes(request: web.Request) -> web.Response:
    listing = [
        {"index": p.index, "pid": p.pid, "state": p.state, "failures": p.failures,
         "admin": p.admin_url}
        for p in request.app[SUPERVISOR].processes()
    ]
    return web.json_response({"processes": listing})
