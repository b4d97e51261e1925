"""Faults stay with the request that met them: the chaos invariant, small and deterministic.

The same mix as `python -m loadtests --only chaos` (tests/support/chaos.py), cut down so it
runs in a few seconds: half the requests meet a fault of their own (503 or reset before
headers, stall before the first chunk, cut or stall mid-stream, broken chunked framing), half
the clients disconnect early, and ejection is set to trip easily. The requests whose own
upstream behaves must still be answered in full.
"""

from __future__ import annotations

from tests.support import chaos


async def test_requests_whose_upstream_behaves_are_answered_whatever_the_others_meet(
    start_gateway,
):
    async with chaos.upstreams() as (primary, fallback):
        gw = await start_gateway(
            chaos.gateway_yaml(
                primary, fallback, consecutive_failures=2, first_chunk="200ms", chunk_gap="200ms"
            )
        )
        tally = await chaos.run(gw.url, count=160, concurrency=32, seed=12, within_s=30)
    assert tally.good >= 30, tally.summary()  # the plan really has well-behaved readers
    assert tally.good_served == tally.good - tally.good_refused, tally.summary()
    # Faulty requests did trip ejection: the invariant was tested, not dodged.
    registry = gw.gateway.metrics.registry
    ejections = [
        registry.get_sample_value("streamgate_endpoint_ejections_total", {"upstream": u}) or 0
        for u in ("primary", "backup")
    ]
    assert sum(ejections) >= 1, ejections
