"""The scenarios, in the order the standard set runs them. Each module has KEY, TITLE and
`async def run(bench) -> ScenarioResult`."""

from __future__ import annotations

from . import (
    ceiling,
    chaos,
    cpu_per_chunk,
    disconnect,
    grpc,
    memory,
    routing,
    stream_rate,
    ttfc,
    websocket,
)

SCENARIOS = {m.KEY: m for m in (ceiling, ttfc, cpu_per_chunk, stream_rate, memory, disconnect,
                                routing, chaos, websocket, grpc)}
