"""What the supervisor asks its serving processes, over their private admin listeners."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import aiohttp

from gateway.admin.fanout import Process
from gateway.upstreams.worker import Worker

ASK_AGAIN_S = 0.05
STARTING_S = 60.0
"""How long a process starting up may take before its admin listener answers."""
RELOAD_TIMEOUT_S = 30.0
"""How long one process may take to reload (starting its new runtime: Redis, tracing)."""


async def ask_reload(session: aiohttp.ClientSession, worker: Worker) -> list[str]:
    """Ask one process to reload from the bundle just written: its errors, each naming it.
    One not running reads the bundle when it starts; one starting is asked again until its
    admin listener answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTING_S
    timeout = aiohttp.ClientTimeout(total=RELOAD_TIMEOUT_S)
    url = worker.endpoint.url + "/admin/reload"
    while worker.process is not None and worker.process.alive:
        try:
            async with session.post(url, timeout=timeout) as response:
                answer = await response.json()
            return [f"process {worker.index}: {e}" for e in answer.get("errors", ())]
        except (aiohttp.ClientConnectionError, TimeoutError, ValueError) as exc:
            if loop.time() >= deadline:
                return [f"process {worker.index}: did not answer the reload: {exc!r}"]
            await asyncio.sleep(ASK_AGAIN_S)
    return []


async def streaming_on(
    session: aiohttp.ClientSession, processes: Iterable[Process], urls: set[str]
) -> bool:
    """Whether any running process has a stream on one of `urls` (endpoints)."""
    for process in processes:
        if not process.alive:
            continue
        try:
            async with session.get(process.admin_url + "/admin/streams") as response:
                streams = (await response.json())["streams"]
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            continue
        if any(stream.get("endpoint") in urls for stream in streams):
            return True
    return False
