"""What a gateway under test still holds once a request is over, for the tests that assert
"released on every path" (hedging, resume)."""

from __future__ import annotations

import asyncio


def metric(gw, name: str, **labels: str) -> float:
    """One sample of the gateway's registry (0 when it was never observed)."""
    return gw.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


async def nothing_held(gw) -> None:
    """Wait (bounded) until no stream and no unit of the `slots` limit is held, then check
    that no endpoint has a request outstanding."""
    runtime = gw.runtime
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2
    while runtime.streams or runtime.admission.semaphores["slots"].in_use:
        assert loop.time() < deadline, "the request still holds its stream or units"
        await asyncio.sleep(0.005)
    for pool in runtime.pools.values():
        assert all(ep.outstanding == 0 for ep in pool.endpoints)
