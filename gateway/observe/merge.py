"""One /metrics for several serving processes: their expositions merged into one.

The supervisor scrapes each serving process's private admin listener and merges the series
of the same name and labels:

- counters and histograms add up (buckets, counts and sums alike: every process uses the
  same buckets). A process that restarts starts again from zero; what it had counted by its
  last scrape is kept and added on, so a merged counter never goes backwards for a restart
  and `rate()` stays honest (what it counted after that scrape is lost with it);
- gauges add up (streams, units in use, requests waiting; a `scope: local` limit's capacity,
  split between the processes), except where each process reports the same shared fact:
  `scope: global` capacities (`max`), endpoint health and shared-state reachability (`min`:
  1 only when every process sees it so), panic (`max`), creation times (`min`);
- families the supervisor writes itself (config reloads, worker and process restarts) are
  its own, not the processes' (each process counts the reloads the supervisor asks of it).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]
"""(sample name, sorted labels)."""

SHARED_FACTS: Mapping[str, Callable[[Iterable[float]], float]] = {
    "streamgate_endpoint_healthy": min,
    "streamgate_shared_state_up": min,
    "streamgate_upstream_panic": max,
}
ADDITIVE = ("counter", "histogram", "summary")


class MergedMetrics:
    """Merges scrapes; remembers each process's last one, to carry its counts over restarts."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[int, list[Metric]]] = {}
        """Process index → (pid, families) of its last scrape."""
        self._retired: dict[SeriesKey, float] = {}
        """Counts of processes that have since been replaced."""

    def merge(
        self, scrapes: Mapping[int, tuple[int, str]], own: str, shared_limits: Collection[str]
    ) -> bytes:
        """`scrapes`: process index → (pid, exposition text); `own`: the supervisor's own
        exposition; `shared_limits`: names of `scope: global` limits. Returns the text."""
        for index, (pid, text) in scrapes.items():
            previous = self._last.get(index)
            if previous is not None and previous[0] != pid:
                self._retire(previous[1])
            self._last[index] = (pid, list(text_string_to_metric_families(text)))
        families: dict[str, Metric] = {}
        values: dict[str, dict[SeriesKey, list[float]]] = {}
        for index in scrapes:
            for family in self._last[index][1]:
                families.setdefault(family.name, family)
                series = values.setdefault(family.name, {})
                for sample in family.samples:
                    series.setdefault(_key(sample.name, sample.labels), []).append(sample.value)
        for name, family in families.items():
            merged = {
                key: _merge_one(family, key, vals, shared_limits)
                for key, vals in values[name].items()
            }
            if family.type in ADDITIVE:
                for key in merged:
                    merged[key] += self._retired.get(key, 0.0)
            families[name] = _family(family, merged)
        for family in text_string_to_metric_families(own):
            if family.samples:
                families[family.name] = family
        return _render(families.values())

    def _retire(self, families: list[Metric]) -> None:
        for family in families:
            if family.type not in ADDITIVE:
                continue
            for sample in family.samples:
                key = _key(sample.name, sample.labels)
                self._retired[key] = self._retired.get(key, 0.0) + sample.value


def _merge_one(
    family: Metric, key: SeriesKey, values: list[float], shared_limits: Collection[str]
) -> float:
    if family.type in ADDITIVE:
        return sum(values)
    if family.name.endswith("_created"):
        return min(values)
    if family.name in SHARED_FACTS:
        return SHARED_FACTS[family.name](values)
    if family.name == "streamgate_concurrency_capacity" and dict(key[1]).get("limit") in (
        shared_limits
    ):
        return max(values)  # a `scope: global` limit's capacity is the same in every process
    return sum(values)


def _key(name: str, labels: Mapping[str, str]) -> SeriesKey:
    return name, tuple(sorted(labels.items()))


def _family(template: Metric, merged: Mapping[SeriesKey, float]) -> Metric:
    family = Metric(template.name, template.documentation, template.type)
    for (name, labels), value in merged.items():
        family.add_sample(name, dict(labels), value)
    return family


def _render(families: Iterable[Metric]) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Fixed(list(families)))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
