"""What `server.workers` does to a config and to metrics, without processes: each serving
process's share of the in-memory limits, the checks that keep a split admissible, and how
the supervisor merges the processes' /metrics (tests/test_multiprocess.py runs them for real).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.loader import load_config_text
from gateway.config.model import HttpUpstream
from gateway.config.processes import for_process, share
from gateway.config.units import available_cpus
from gateway.errors import ConfigErrors
from gateway.explain import _facts, explain_lines
from gateway.observe.merge import MergedMetrics

BASE = """\
server: {listen: 127.0.0.1:8080, workers: %s}
upstreams:
  api: {kind: http, endpoints: [{url: "http://127.0.0.1:9"}], max_connections: 5}
  pool:
    kind: worker_pool
    command: [streamgate, fake-llm, --port, "{port}"]
    count: 2
    ready: {path: /ready, interval: 3s}
limits:
  concurrency:
    slots: {capacity: 7, max_queue: 3, weights: {stream: 2}}
    shared: {capacity: 4, scope: global}
  rate:
    per-key: {rate: 10, per: 1s, key: client_ip}
  tokens:
    budget: {tokens: 1001}
state: {backend: redis}
routes:
  - {name: r, upstream: api, match: {path_prefix: /}, limits: [per-key, budget, slots, shared]}
"""


def config(workers="2", text=BASE):
    return load_config_text(text % workers, "gw.yaml", env={})


@pytest.mark.parametrize("total", [0, 1, 2, 7, 100, 1001])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_the_shares_add_up_to_the_whole_and_differ_by_at_most_one(total, count):
    shares = [share(total, i, count) for i in range(count)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_each_process_gets_its_share_of_every_local_bound_and_all_of_a_global_one():
    whole = config()
    urls = {"pool": ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]}
    first, second = (for_process(whole, i, 8080, 9000 + i, urls) for i in range(2))
    for name, field in (("slots", "capacity"), ("slots", "max_queue")):
        parts = [getattr(c.limits.concurrency[name], field) for c in (first, second)]
        assert parts == [4, 3] if field == "capacity" else parts == [2, 1]
    assert [c.limits.concurrency["shared"].capacity for c in (first, second)] == [4, 4]
    assert [c.limits.rate["per-key"].rate for c in (first, second)] == [5.0, 5.0]
    assert [c.limits.tokens["budget"].tokens for c in (first, second)] == [501, 500]
    assert [c.upstreams["api"].max_connections for c in (first, second)] == [3, 2]
    assert (first.admin.listen, second.admin.listen) == (("127.0.0.1", 9000), ("127.0.0.1", 9001))


def test_a_worker_pool_becomes_an_http_upstream_over_the_supervisors_workers():
    urls = {"pool": ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]}
    pool = for_process(config(), 0, 8080, 9000, urls).upstreams["pool"]
    assert isinstance(pool, HttpUpstream)
    assert [e.url for e in pool.endpoints] == urls["pool"]
    assert pool.health is not None
    assert (pool.health.path, pool.health.interval, pool.health.unhealthy_after) == (
        "/ready",
        3.0,
        1,
    )


@pytest.mark.parametrize(
    "replace, workers, path, line",
    [
        ("capacity: 7,", "4", "limits.concurrency.slots.capacity", 11),
        ("rate: 10,", "11", "limits.rate.per-key.rate", 14),
        ("tokens: 1001", "1002", "limits.tokens.budget.tokens", 16),
        ("max_connections: 5", "6", "upstreams.api.max_connections", 3),
    ],
    ids=["capacity-below-weight", "rate-below-one", "tokens-below-one", "max-connections"],
)
def test_a_bound_too_small_to_split_is_an_error_at_its_line(replace, workers, path, line):
    assert replace in BASE
    with pytest.raises(ConfigErrors) as caught:
        config(workers)
    found = [e for e in caught.value.errors if e.path == path]
    assert found and found[0].line == line, [str(e) for e in caught.value.errors]
    assert f"split across {workers} serving processes" in found[0].message


def test_workers_auto_is_one_per_available_cpu_and_a_bad_value_names_its_position():
    plain = BASE.split("limits:")[0].replace("max_connections: 5", "max_connections: 4096")
    plain += "routes: [{name: r, upstream: api, match: {path_prefix: /}}]\n"
    assert config("auto", plain).server.workers == available_cpus()
    with pytest.raises(ConfigErrors) as caught:
        config("many")
    assert [str(e) for e in caught.value.errors] == [
        "gw.yaml:1:43: server.workers: expected a whole number of processes or auto, got 'many'"
    ]
    with pytest.raises(ConfigErrors, match="server.workers: must be at least 1"):
        config("0")


def test_the_command_line_overrides_server_workers_before_the_checks():
    text = BASE % "1"
    assert load_config_text(text, "gw.yaml", env={}).server.workers == 1
    with pytest.raises(ConfigErrors, match="capacity 7 is split across 4"):
        load_config_text(text, "gw.yaml", env={}, workers=4)


def test_serve_rejects_a_workers_flag_that_is_not_a_count():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--workers", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "--workers: must be at least 1, got 0" in result.stderr


def test_explain_says_a_local_limit_is_split_between_the_processes():
    facts, _ = _facts("POST", "/v1/chat", [], '{"stream": true}')
    lines = explain_lines(config(), facts, stream=True)
    text = "\n".join(lines)
    assert "slots: concurrency, weight 2 of 7 units" in text
    assert "(local, split across 2 serving processes: each has its share)" in text
    assert "shared: concurrency, weight 1 of 4 units, queue up to 1000 requests (global)" in text


# ----------------------------------------------------------------- merging /metrics


def exposition(requests: float, in_use: float, healthy: float, capacity: dict) -> str:
    registry = CollectorRegistry()
    Counter("streamgate_requests", "Requests.", ["route"], registry=registry).labels("r").inc(
        requests
    )
    Gauge("streamgate_concurrency_in_use", "Units.", ["limit"], registry=registry).labels(
        "slots"
    ).set(in_use)
    gauge = Gauge("streamgate_concurrency_capacity", "Cap.", ["limit"], registry=registry)
    for limit, value in capacity.items():
        gauge.labels(limit).set(value)
    Gauge(
        "streamgate_endpoint_healthy", "Up.", ["upstream", "endpoint"], registry=registry
    ).labels("u", "http://e").set(healthy)
    return generate_latest(registry).decode()


def values(text: bytes) -> dict[tuple[str, str], float]:
    return {
        (s.name, ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_merged_metrics_add_counts_and_load_but_not_shared_facts():
    a = exposition(3, 1, 1, {"slots": 4, "shared": 10})
    b = exposition(5, 2, 0, {"slots": 3, "shared": 10})
    merged = values(MergedMetrics().merge({0: (100, a), 1: (101, b)}, "", {"shared"}))
    assert merged[("streamgate_requests_total", "route=r")] == 8
    assert merged[("streamgate_concurrency_in_use", "limit=slots")] == 3
    assert merged[("streamgate_concurrency_capacity", "limit=slots")] == 7
    assert merged[("streamgate_concurrency_capacity", "limit=shared")] == 10
    assert merged[("streamgate_endpoint_healthy", "endpoint=http://e,upstream=u")] == 0


def test_a_restarted_process_keeps_what_it_had_counted_and_gauges_start_over():
    merger = MergedMetrics()
    merger.merge({0: (100, exposition(3, 2, 1, {})), 1: (101, exposition(5, 0, 1, {}))}, "", ())
    # Process 0 was replaced (a new pid) and starts again from zero.
    merged = values(
        merger.merge({0: (200, exposition(1, 0, 1, {})), 1: (101, exposition(6, 0, 1, {}))}, "", ())
    )
    assert merged[("streamgate_requests_total", "route=r")] == 3 + 1 + 6
    assert merged[("streamgate_concurrency_in_use", "limit=slots")] == 0


def test_the_supervisors_own_series_replace_the_processes():
    registry = CollectorRegistry()
    Counter("streamgate_config_reloads", "Reloads.", ["result"], registry=registry).labels(
        "ok"
    ).inc()
    child = textwrap.dedent("""\
        # HELP streamgate_config_reloads_total Reloads.
        # TYPE streamgate_config_reloads_total counter
        streamgate_config_reloads_total{result="ok"} 1.0
        """)
    own = generate_latest(registry).decode()
    merged = values(MergedMetrics().merge({0: (1, child), 1: (2, child)}, own, ()))
    assert merged[("streamgate_config_reloads_total", "result=ok")] == 1
