"""Counters, gauges and histograms for the request path: plain numbers, no lock.

prometheus_client's metrics take a lock for every update and walk a histogram's buckets in
Python; on the request path that was about a tenth of the gateway's work per request. Every
update here happens on the event loop's thread, and so does every scrape (the admin listener
runs on the same loop), so plain numbers are enough: an update is an attribute or list item
incremented, and the families are built at scrape time, with the names, help, label names
and bucket bounds prometheus_client's own metrics would show.

`labels(*values)` is memoized, so callers may keep the child for as long as its labels hold
(a stream keeps its route's chunk-gap histogram).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)


class Value:
    """A counter's or a gauge's child."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Buckets(list):
    """A histogram's child: [count per bucket..., count above the last bound, sum].

    Hot loops may update it inline: `b[bisect_left(b.bounds, x)] += 1; b[-1] += x`."""

    __slots__ = ("bounds",)

    def __init__(self, bounds: tuple[float, ...]) -> None:
        super().__init__([0] * (len(bounds) + 1) + [0.0])
        self.bounds = bounds

    def observe(self, amount: float) -> None:
        self[bisect_left(self.bounds, amount)] += 1
        self[-1] += amount


class _Family:
    """One metric and its children, registered as a collector."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        registry.register(self)

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._child()
        return child

    def _child(self):
        return Value()

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        yield family

    def describe(self) -> Iterable[Metric]:
        """Names only: lets the registry refuse a duplicate without collecting."""
        yield self._family()


class LoopCounter(_Family):
    def _family(self) -> Metric:
        name = self.name[: -len("_total")] if self.name.endswith("_total") else self.name
        return CounterMetricFamily(name, self.documentation, labels=self.labelnames)


class LoopGauge(_Family):
    def _family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)


class LoopHistogram(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labelnames, registry)
        self.bounds = tuple(float(b) for b in buckets)
        """Floats only: a float compared with a float is the cheapest comparison."""
        self._le = [repr(b) for b in self.bounds] + ["+Inf"]

    def _child(self) -> Buckets:
        return Buckets(self.bounds)

    def _family(self) -> Metric:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, counts in self._children.items():
            cumulative, buckets = 0, []
            for le, count in zip(self._le, counts, strict=False):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, counts[-1])
        yield family
