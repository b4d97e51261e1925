"""The request as observation sees it."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class ObservedRequest(Protocol):
    """What metrics, traces and the access log read of a request: the engine's
    RequestContext, seen from the layer below it."""

    request_id: str
    method: str
    path: str
    route_name: str
    upstream: str | None
    endpoint: str | None
    model: str | None
    stream: bool
    status: int
    attempts: int
    tries: list[Any]
    """Each request sent upstream: `upstream`, `url`, `why`, `reason`, `result`."""
    resumes: int
    chunks: int
    bytes: int
    outcome: str
    error_kind: str | None
    started: float
    loop: asyncio.AbstractEventLoop
    first_chunk_at: float | None
    route: Any
    """The route config it matched (None before routing)."""
    usage: tuple[int, int] | None
    protocol: str
    """The client's: "http", or "websocket" for a session."""
    messages_in: int
    """Messages a session's client sent upstream."""
