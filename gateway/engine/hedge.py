"""The hedge budget of one route: how many of its recent requests may be hedged.

A hedge is a second request to a backend that may be slow because it is overloaded, so hedges
must stay a small share of the traffic or hedging would double the load exactly when a backend
struggles. The budget counts the route's requests and hedges over the last `WINDOW_S` seconds
(in one-second buckets, so the count slides) and allows a hedge while hedges stay within
`budget_percent` of the requests, rounded down, with a floor of one per window so that a quiet
route can hedge at all. It lives with the runtime, so a reload starts it afresh.
"""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW_S = 10
"""Seconds of history the budget weighs."""


class HedgeBudget:
    __slots__ = ("percent", "_requests", "_hedges", "_second", "_clock")

    def __init__(self, percent: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.percent = percent
        self._clock = clock
        self._requests = [0] * WINDOW_S
        self._hedges = [0] * WINDOW_S
        self._second = int(clock())

    def request(self) -> None:
        """One more request of the route (whether it is hedged or not)."""
        self._requests[self._roll()] += 1

    def room(self) -> bool:
        """Whether one more hedge fits the budget now."""
        if not self.percent:
            return False
        self._roll()
        return sum(self._hedges) < max(1, sum(self._requests) * self.percent // 100)

    def spend(self) -> None:
        """One hedge started."""
        self._hedges[self._roll()] += 1

    def _roll(self) -> int:
        """Empty the buckets of the seconds that passed; the current second's bucket."""
        now = int(self._clock())
        if now != self._second:
            for second in range(max(self._second + 1, now - WINDOW_S + 1), now + 1):
                self._requests[second % WINDOW_S] = self._hedges[second % WINDOW_S] = 0
            self._second = now
        return now % WINDOW_S
