"""The bundled fake-llm served in the test's own event loop, on a free 127.0.0.1 port.

The same application `streamgate fake-llm` runs (with handler cancellation, as `serve` sets
it), without the cost of a child process, so a test can start one per backend role and read
its counters directly:

    async with fake_llm(ttft=20) as slow, fake_llm(prefill="refuse") as strict:
        ... slow.url ... await slow.wait_until(lambda s: s.client_gone == 1, 2, "a close")

`answer(body, tokens)` is the canonical text fake-llm gives a request: what a client of the
gateway must receive, exactly once, however the answer was rescued.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.fake_llm import CHAT, STATS, Completion, Knobs, Stats, build_app


@dataclass
class InProcessLLM:
    url: str
    stats: Stats

    async def wait_until(self, predicate: Callable[[Stats], bool], timeout: float, what: str):
        """Poll the counters (they change on the same loop) until `predicate` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self.stats):
            if loop.time() > deadline:
                raise AssertionError(f"no {what} within {timeout}s: {self.stats.snapshot()}")
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def fake_llm(**knobs: Any) -> AsyncIterator[InProcessLLM]:
    app = build_app(Knobs(**knobs))
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield InProcessLLM(f"http://127.0.0.1:{port}", app[STATS])
    finally:
        await runner.cleanup()


def answer(body: dict[str, Any], tokens: int = 16, seed: int = 0) -> str:
    """The text fake-llm answers `body` with (a chat request)."""
    return Completion(CHAT, body, tokens, seed).text
