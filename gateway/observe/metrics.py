"""Prometheus metrics, defined once per gateway process (names are binding: SPEC section 6).

Labels come from config names only (route, upstream, limit, endpoint URL from config), never
from request data, so cardinality is bounded by the config.

Cost on the hot path is kept near zero:
- gauges that mirror state (concurrency in use, endpoint health) are read at scrape time by a
  collector, so the request path never touches them;
- the metrics a request updates are `loop_metrics` families: plain numbers with no lock,
  exported at scrape time; the per-chunk gap histogram is a plain list per route that the
  relay increments inline;
- everything else is observed once per request, in `Runtime.observe`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from gateway.observe.budget_metrics import BudgetMetrics
from gateway.observe.genai_metrics import GenAIMetrics
from gateway.observe.loop_metrics import LoopCounter, LoopGauge, LoopHistogram
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
        self.requests = LoopCounter(
            "streamgate_requests_total",
            "Requests by final status.",
            ["route", "upstream", "status", "stream"],
            r,
        )
        self.time_to_first_chunk = LoopHistogram(
            "streamgate_time_to_first_chunk_seconds",
            "Request arrival to the commit point (first content chunk).",
            ["route", "upstream"],
            r,
            FIRST_CHUNK_BUCKETS,
        )
        self.chunk_gap = LoopHistogram(
            "streamgate_chunk_gap_seconds",
            "Silence between two body chunks of a committed stream.",
            ["route"],
            r,
            CHUNK_GAP_BUCKETS,
        )
        self.stream_duration = LoopHistogram(
            "streamgate_stream_duration_seconds",
            "Committed responses, arrival to last byte.",
            ["route", "outcome"],
            r,
            DURATION_BUCKETS,
        )
        self.chunks_per_stream = LoopHistogram(
            "streamgate_chunks_per_stream",
            "Body chunks (SSE events) relayed per stream.",
            ["route"],
            r,
            CHUNK_COUNT_BUCKETS,
        )
        self.stream_errors = LoopCounter(
            "streamgate_stream_errors_total",
            "Streams ended by an error after the commit point.",
            ["route", "kind"],
            r,
        )
        self.client_disconnects = LoopCounter(
            "streamgate_client_disconnects_total",
            "Clients that went away before the end.",
            ["route"],
            r,
        )
        self.active_streams = LoopGauge(
            "streamgate_active_streams", "Streams past the commit point.", ["route"], r
        )
        self.queue_wait = LoopHistogram(
            "streamgate_queue_wait_seconds",
            "Time spent waiting for concurrency units.",
            ["limit"],
            r,
            QUEUE_BUCKETS,
        )
        self.rate_limited = LoopCounter(
            "streamgate_rate_limited_total",
            "Requests rejected by a rate limit.",
            ["limit"],
            r,
        )
        self.upstream_attempts = LoopCounter(
            "streamgate_upstream_attempts_total",
            "Tries on an upstream, by outcome.",
            ["upstream", "outcome"],
            r,
        )
        self.retries = LoopCounter(
            "streamgate_retries_total",
            "Retries and fallbacks before the first chunk, by reason.",
            ["route", "reason"],
            r,
        )
        self.backpressure_stalls = LoopCounter(
            "streamgate_backpressure_stalls_total",
            "Times a full buffer stopped reading from the upstream.",
            ["route"],
            r,
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
        self.tokens = LoopCounter(
            "streamgate_tokens_total",
            "Tokens the upstream reported in `usage`.",
            ["route", "upstream", "type"],
            r,
        )
        self.output_tokens_per_second = LoopHistogram(
            "streamgate_output_tokens_per_second",
            "Completion tokens per second of streaming, where the upstream reports usage.",
            ["route", "upstream"],
            r,
            TOKENS_PER_S_BUCKETS,
        )
        self.upstream_pool_wait = LoopHistogram(
            "streamgate_upstream_pool_wait_seconds",
            "Time a try waited for one of its upstream's max_connections.",
            ["upstream"],
            r,
            QUEUE_BUCKETS,
        )
        self.upstream_pool_exhausted = LoopCounter(
            "streamgate_upstream_pool_exhausted_total",
            "Tries that gave up waiting for one of the upstream's max_connections.",
            ["upstream"],
            r,
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
