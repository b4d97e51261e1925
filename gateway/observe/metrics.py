"""Prometheus metrics, defined once per gateway process (names are binding: SPEC section 6).

Labels come from config names only (route, upstream, limit, endpoint URL from config), never
from request data, so cardinality is bounded by the config.

Cost on the hot path is kept near zero:
- gauges that mirror state (concurrency in use, endpoint health) are read at scrape time by a
  collector, so the request path never touches them;
- the per-chunk gap histogram is a plain list of bucket counts per route, incremented with
  one bisect and no lock (the event loop is single-threaded), exported at scrape time;
- everything else is observed once per request, in `observe`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from gateway.observe.budget_metrics import BudgetMetrics
from gateway.observe.genai_metrics import GenAIMetrics
from gateway.observe.rescue_metrics import RescueMetrics
from gateway.observe.session_metrics import SessionMetrics

NO_NAME = "none"
"""The `route` or `upstream` label of a request refused before one was chosen (404, 413, 429,
400, ...): one fixed, documented value, never an empty string."""


# Buckets for LLM traffic: first chunks in milliseconds to a minute, streams up to half an hour.
FIRST_CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
CHUNK_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
CHUNK_COUNT_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKENS_PER_S_BUCKETS = (1, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


class ChunkGapHistogram:
    """streamgate_chunk_gap_seconds{route}: bucket counts in plain lists, exported at scrape."""

    def __init__(self) -> None:
        self._routes: dict[str, list] = {}

    def for_route(self, route: str) -> list:
        """[bucket counts..., +Inf count, sum]; the relay keeps it for the stream's life."""
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = [0] * (len(CHUNK_GAP_BUCKETS) + 1) + [0.0]
        return series

    @staticmethod
    def observe(series: list, seconds: float) -> None:
        series[bisect_left(CHUNK_GAP_BUCKETS, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterable[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "streamgate_chunk_gap_seconds",
            "Silence between two body chunks of a committed stream.",
            labels=["route"],
        )
        for route, series in self._routes.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*CHUNK_GAP_BUCKETS, float("inf")), series[:-1], strict=True):
                cumulative += count
                buckets.append((_bound(bound), cumulative))
            family.add_metric([route], buckets, series[-1])
        yield family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class StateCollector:
    """Gauges read from live state at scrape time: concurrency, endpoint health, shared state."""

    def __init__(self, runtime: Callable[[], object]) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[GaugeMetricFamily]:
        runtime = self._runtime()
        if runtime is None:
            return
        in_use = GaugeMetricFamily(
            "streamgate_concurrency_in_use", "Concurrency units held.", labels=["limit"]
        )
        capacity = GaugeMetricFamily(
            "streamgate_concurrency_capacity", "Concurrency units available.", labels=["limit"]
        )
        waiting = GaugeMetricFamily(
            "streamgate_concurrency_waiting", "Requests queued for units.", labels=["limit"]
        )
        for name, semaphore in runtime.admission.semaphores.items():
            in_use.add_metric([name], semaphore.in_use)
            capacity.add_metric([name], semaphore.capacity)
            waiting.add_metric([name], semaphore.waiting)
        healthy = GaugeMetricFamily(
            "streamgate_endpoint_healthy",
            "1 when the endpoint is in rotation (healthy and not ejected for any model).",
            labels=["upstream", "endpoint"],
        )
        for pool in runtime.pools.values():
            for endpoint in pool.endpoints:
                in_rotation = pool.endpoint_in_rotation(endpoint)
                healthy.add_metric([pool.name, endpoint.url], 1.0 if in_rotation else 0.0)
        panic = GaugeMetricFamily(
            "streamgate_upstream_panic",
            "1 while too few of the upstream's endpoints are in rotation (panic threshold):"
            " it balances across all of them.",
            labels=["upstream"],
        )
        for pool in runtime.pools.values():
            panic.add_metric([pool.name], 1.0 if pool.panic_reasons() else 0.0)
        yield from (in_use, capacity, waiting, healthy, panic, _shared_state_up(runtime))


def _shared_state_up(runtime) -> GaugeMetricFamily:
    """streamgate_shared_state_up: 0 while Redis (for `scope: global` limits) is unreachable;
    1 when its last call succeeded, or when no limit is global (nothing shared to lose)."""
    state = runtime.admission.shared_state
    up = GaugeMetricFamily(
        "streamgate_shared_state_up",
        "1 when shared state (Redis) answered its last call or is not used; 0 while unreachable.",
    )
    up.add_metric([], 1.0 if state is None or state.up else 0.0)
    return up


class Metrics:
    def __init__(self, runtime: Callable[[], object] = lambda: None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "streamgate_requests_total",
            "Requests by final status.",
            ["route", "upstream", "status", "stream"],
            registry=r,
        )
        self.time_to_first_chunk = Histogram(
            "streamgate_time_to_first_chunk_seconds",
            "Request arrival to the commit point (first content chunk).",
            ["route", "upstream"],
            buckets=FIRST_CHUNK_BUCKETS,
            registry=r,
        )
        self.chunk_gap = ChunkGapHistogram()
        r.register(self.chunk_gap)
        self.stream_duration = Histogram(
            "streamgate_stream_duration_seconds",
            "Committed responses, arrival to last byte.",
            ["route", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.chunks_per_stream = Histogram(
            "streamgate_chunks_per_stream",
            "Body chunks (SSE events) relayed per stream.",
            ["route"],
            buckets=CHUNK_COUNT_BUCKETS,
            registry=r,
        )
        self.stream_errors = Counter(
            "streamgate_stream_errors_total",
            "Streams ended by an error after the commit point.",
            ["route", "kind"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "streamgate_client_disconnects_total",
            "Clients that went away before the end.",
            ["route"],
            registry=r,
        )
        self.active_streams = Gauge(
            "streamgate_active_streams", "Streams past the commit point.", ["route"], registry=r
        )
        self.queue_wait = Histogram(
            "streamgate_queue_wait_seconds",
            "Time spent waiting for concurrency units.",
            ["limit"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "streamgate_rate_limited_total",
            "Requests rejected by a rate limit.",
            ["limit"],
            registry=r,
        )
        self.upstream_attempts = Counter(
            "streamgate_upstream_attempts_total",
            "Tries on an upstream, by outcome.",
            ["upstream", "outcome"],
            registry=r,
        )
        self.retries = Counter(
            "streamgate_retries_total",
            "Retries and fallbacks before the first chunk, by reason.",
            ["route", "reason"],
            registry=r,
        )
        self.backpressure_stalls = Counter(
            "streamgate_backpressure_stalls_total",
            "Times a full buffer stopped reading from the upstream.",
            ["route"],
            registry=r,
        )
        self.worker_restarts = Counter(
            "streamgate_worker_restarts_total",
            "Worker pool process restarts.",
            ["upstream"],
            registry=r,
        )
        self.process_restarts = Counter(
            "streamgate_process_restarts_total",
            "Serving process restarts by the supervisor (server.workers above 1).",
            registry=r,
        )
        self.config_reloads = Counter(
            "streamgate_config_reloads_total", "Config reloads by result.", ["result"], registry=r
        )
        self.tokens = Counter(
            "streamgate_tokens_total",
            "Tokens the upstream reported in `usage`.",
            ["route", "upstream", "type"],
            registry=r,
        )
        self.output_tokens_per_second = Histogram(
            "streamgate_output_tokens_per_second",
            "Completion tokens per second of streaming, where the upstream reports usage.",
            ["route", "upstream"],
            buckets=TOKENS_PER_S_BUCKETS,
            registry=r,
        )
        self.upstream_pool_wait = Histogram(
            "streamgate_upstream_pool_wait_seconds",
            "Time a try waited for one of its upstream's max_connections.",
            ["upstream"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.upstream_pool_exhausted = Counter(
            "streamgate_upstream_pool_exhausted_total",
            "Tries that gave up waiting for one of the upstream's max_connections.",
            ["upstream"],
            registry=r,
        )
        self.endpoint_ejections = Counter(
            "streamgate_endpoint_ejections_total",
            "Passive ejections of an endpoint (for one model) by outlier detection.",
            ["upstream"],
            registry=r,
        )
        self.bad_requests = Counter(
            "streamgate_bad_requests_total",
            "Requests refused by the HTTP parser or its timeouts before routing, by reason.",
            ["reason"],
            registry=r,
        )
        self.budgets = BudgetMetrics(r)
        self.sessions = SessionMetrics(r)
        self.rescue = RescueMetrics(r)
        r.register(StateCollector(runtime))
        self.genai = GenAIMetrics(r)
        """OTel GenAI names, observed only under `telemetry.genai_metrics: true`."""
        self._children: dict[tuple, object] = {}

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, memoized: prometheus_client takes a lock and builds
        tuples on every call. Label values come from the config, so this stays small."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
