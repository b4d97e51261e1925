"""The fake-llm application: its routes, and the endpoints other than completions."""

from __future__ import annotations

import os
import sys
from typing import Any

from aiohttp import web

from . import generate, websocket
from .faults import error_response
from .generate import KNOBS, STATS
from .knobs import Knobs
from .stats import Stats

MODEL = web.AppKey("model", str)


def build_app(knobs: Knobs, model: str = "fake-llm") -> web.Application:
    """The fake-llm application; run it with `handler_cancellation=True` (see `serve`)."""
    app = web.Application(middlewares=[_count_requests], client_max_size=64 * 2**20)
    app[KNOBS] = knobs
    app[MODEL] = model
    app[STATS] = Stats()
    app.router.add_post("/v1/chat/completions", generate.chat)
    app.router.add_post("/v1/completions", generate.text)
    app.router.add_get("/v1/chat/completions", websocket.chat)  # Inferneo-style WebSocket
    app.router.add_get("/v1/completions", websocket.text)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/debug/env", _env)
    app.router.add_get("/debug/stats", _stats)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


@web.middleware
async def _count_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    request.app[STATS].requests[request.path] += 1
    return await handler(request)


async def _models(request: web.Request) -> web.Response:
    model = {"id": request.app[MODEL], "object": "model", "created": 0, "owned_by": "streamgate"}
    return web.json_response({"object": "list", "data": [model]})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _env(request: web.Request) -> web.Response:
    env = {
        k: v
        for k, v in os.environ.items()
        if k == "CUDA_VISIBLE_DEVICES" or k.startswith("FAKE_LLM_")
    }
    return web.json_response({"pid": os.getpid(), "argv": sys.argv, "env": env})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].snapshot())


async def _not_found(request: web.Request) -> web.Response:
    return error_response(404, f"no such endpoint: {request.method} {request.path}")
