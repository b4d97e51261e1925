"""WebSocket session series (documented additions, README "Metrics"), labelled by route.

Nothing here runs per message: a session's message counts live on its request context, and
the messages counter is read at scrape time as what ended sessions relayed plus what open ones
have relayed so far, so it moves while a long session runs and never goes backwards.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gateway.observe.request import ObservedRequest

UP, DOWN = "client_to_upstream", "upstream_to_client"


class SessionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ended = Counter(
            "streamgate_websocket_sessions_total",
            "WebSocket sessions that ended, by outcome (refused ones included).",
            ["route", "outcome"],
            registry=registry,
        )
        self._open: set[ObservedRequest] = set()
        self._relayed: dict[tuple[str, str], int] = {}
        """(route, direction) → messages relayed by sessions that have ended."""
        registry.register(self)

    def opened(self, ctx: ObservedRequest) -> None:
        """A request went past its commit point: counted if it is a session."""
        if ctx.protocol == "websocket":
            self._open.add(ctx)

    def closed(self, ctx: ObservedRequest) -> None:
        if ctx in self._open:
            self._open.discard(ctx)
            relayed, route = self._relayed, ctx.route_name
            relayed[route, UP] = relayed.get((route, UP), 0) + ctx.messages_in
            relayed[route, DOWN] = relayed.get((route, DOWN), 0) + ctx.chunks

    def observe(self, ctx: ObservedRequest, route: str) -> None:
        if ctx.protocol == "websocket":
            self.ended.labels(route, ctx.outcome).inc()

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        sessions = GaugeMetricFamily(
            "streamgate_active_websocket_sessions",
            "WebSocket sessions open now (past their first upstream message).",
            labels=["route"],
        )
        messages = CounterMetricFamily(
            "streamgate_websocket_messages",
            "Messages relayed by WebSocket sessions, by direction.",
            labels=["route", "direction"],
        )
        open_by_route: dict[str, int] = {}
        relayed = dict(self._relayed)
        for ctx in self._open:
            route = ctx.route_name
            open_by_route[route] = open_by_route.get(route, 0) + 1
            relayed[route, UP] = relayed.get((route, UP), 0) + ctx.messages_in
            relayed[route, DOWN] = relayed.get((route, DOWN), 0) + ctx.chunks
        for route, count in open_by_route.items():
            sessions.add_metric([route], count)
        for (route, direction), count in relayed.items():
            messages.add_metric([route, direction], count)
        yield sessions
        yield messages
