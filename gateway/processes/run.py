"""Run a gateway, or a supervisor of several, until it has stopped: announce where it listens,
and turn signals into reload and drain.

    SIGHUP            reload the config (rejected whole if invalid; the old one keeps serving)
    SIGTERM, SIGINT   drain: /readyz fails, new requests get 503, streams run on for
                      `shutdown_grace`; a second one stops at once
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("streamgate")

GC_FIRST_THRESHOLD = 20_000


class Serving(Protocol):
    """A gateway (app.Gateway) or a supervisor of several (supervisor.Supervisor)."""

    async def start(self) -> tuple[str, str]: ...
    async def reload(self) -> list[str]: ...
    async def drain_and_stop(self) -> None: ...
    async def stop(self) -> None: ...
    async def wait_stopped(self) -> None: ...


class StartFailed(Exception):
    """The gateway could not start; the message says why, in one line for the operator."""


async def run(
    target: Serving, announce: Callable[[str, str], None], shutdown_grace: float
) -> int:
    """Start `target`, announce it, and serve until a drain or a stop has ended it."""
    try:
        proxy_url, admin_url = await target.start()
    except (StartFailed, OSError) as exc:
        print(f"streamgate: cannot start: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await target.stop()
        return 1
    settle_garbage_collector()
    announce(proxy_url, admin_url)
    loop = asyncio.get_running_loop()
    terms = 0

    def on_term() -> None:
        nonlocal terms
        terms += 1
        if terms == 1:
            log.info("draining: new requests get 503; streams may run for %gs", shutdown_grace)
            loop.create_task(target.drain_and_stop())
        else:
            loop.create_task(target.stop())

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(target.reload()))
    await target.wait_stopped()
    return 0


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def settle_garbage_collector() -> None:
    """Keep collector pauses out of stream latency. Everything built at start-up (modules,
    config, pools) lives as long as the process: frozen, full collections no longer walk it.
    Requests allocate many short-lived containers: a higher first threshold collects them in
    fewer, still small, passes."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_FIRST_THRESHOLD, second, third)


def install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
