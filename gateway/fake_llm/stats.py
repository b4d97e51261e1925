"""The counters behind `/debug/stats`."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any


class Stats:
    """Counters behind `/debug/stats`; tests read them to see what the gateway did upstream."""

    __slots__ = (
        "requests",
        "completions_started",
        "completions_active",
        "streams_completed",
        "unary_completed",
        "client_gone",
        "client_gone_monotonic",
        "failures_injected",
        "stalls_injected",
        "resets_injected",
        "ws_sessions",
        "cuts_injected",
        "open_connections",
    )

    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.completions_started = 0
        self.completions_active = 0
        self.streams_completed = 0
        self.unary_completed = 0
        self.client_gone = 0  # completions whose client left before the response was complete
        # time.monotonic() is CLOCK_MONOTONIC, system-wide on Linux: comparable across processes
        self.client_gone_monotonic: collections.deque[float] = collections.deque(maxlen=100)
        self.failures_injected = 0
        self.stalls_injected = 0
        self.resets_injected = 0
        self.ws_sessions = 0  # WebSocket sessions accepted (each may carry many completions)
        self.cuts_injected = 0
        self.open_connections: Callable[[], int] | None = None  # set by whoever runs the app

    def note_client_gone(self) -> None:
        self.client_gone += 1
        self.client_gone_monotonic.append(time.monotonic())

    def snapshot(self) -> dict[str, Any]:
        counters = {name: getattr(self, name) for name in self.__slots__}
        counters["requests"] = dict(self.requests)
        gone = list(self.client_gone_monotonic)
        counters["client_gone_monotonic"] = gone
        counters["last_client_gone_monotonic"] = gone[-1] if gone else None
        counters["open_connections"] = self.open_connections() if self.open_connections else None
        return counters
