"""Balancing policies: each takes the non-empty list of candidates and the pool's turn counter
and picks one (`balance:` in config names them)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from gateway.upstreams.endpoint import Endpoint

Policy = Callable[[list[Endpoint], "itertools.count[int]"], Endpoint]


def round_robin(candidates: list[Endpoint], turn: itertools.count) -> Endpoint:
    return candidates[next(turn) % len(candidates)]


def least_outstanding(candidates: list[Endpoint], turn: itertools.count) -> Endpoint:
    # Rotate the starting point so ties do not always land on the first endpoint.
    start = next(turn) % len(candidates)
    best = candidates[start]
    for ep in itertools.chain(candidates[start + 1 :], candidates[:start]):
        if ep.outstanding < best.outstanding:
            best = ep
    return best


def weighted(candidates: list[Endpoint], turn: itertools.count) -> Endpoint:
    """Smooth weighted round robin (as nginx does): spreads picks evenly within a cycle."""
    total = 0
    best = candidates[0]
    for ep in candidates:
        ep.current_weight += ep.weight
        total += ep.weight
        if ep.current_weight > best.current_weight:
            best = ep
    best.current_weight -= total
    return best


POLICIES: dict[str, Policy] = {
    "round_robin": round_robin,
    "least_outstanding": least_outstanding,
    "weighted": weighted,
}
