"""Process-wide settings for serving: the event loop, the garbage collector."""

from __future__ import annotations

import asyncio
import gc


def settle_garbage_collector() -> None:
    """Keep collector pauses out of stream latency. Everything built at start-up (modules,
    config, pools) lives as long as the process: frozen, full collections no longer walk it.
    Requests allocate many short-lived containers: a higher first threshold collects them in
    fewer, still small, passes."""
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_FIRST_THRESHOLD, second, third)


GC_FIRST_THRESHOLD = 20_000


def install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
