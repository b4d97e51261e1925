"""The Grafana dashboard (helm/streamgate/dashboards/streamgate.json): every PromQL expression
names only metrics the gateway exports (SPEC section 6 and the documented additions), quantiles are computed the
right way, and each question the dashboard promises to answer has its panel."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.observe.metrics import Metrics
from tests.support.spec_metrics import DOCUMENTED_ADDITIONS, SPEC_SECTION_6

DASHBOARD = Path(__file__).resolve().parent.parent / "helm/streamgate/dashboards/streamgate.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


# PromQL words that are not metric names when they stand alone.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
            "group_left", "group_right", "inf", "nan"}


def _exported_names() -> dict[str, str]:
    """{sample name a query may use: base metric name}, from the gateway's own registry."""
    empty_runtime = SimpleNamespace(
        admission=SimpleNamespace(semaphores={}, shared_state=None), pools={}
    )
    registry = Metrics(lambda: empty_runtime).registry
    names: dict[str, str] = {}
    for family in registry.collect():
        if family.type == "counter":  # prometheus_client drops `_total` from the family name
            names[family.name + "_total"] = family.name + "_total"
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                names[family.name + suffix] = family.name
        else:
            names[family.name] = family.name
    return names


EXPORTED = _exported_names()


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery selectors
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b\d[\w.]*", "", expr)  # numbers and durations (offset 5m)
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word, rest = match.group(), expr[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS or word.startswith("$"):
            continue  # a function or aggregation, a keyword
        if expr[match.start() - 1 : match.start()] == "$":
            continue  # a Grafana variable such as $__rate_interval
        names.add(word)
    return names


def test_metric_names_reads_promql():
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route=~"$route", x="b c"}'
        "[$__rate_interval]))) / on (route) group_left sum(b_total offset 5m) > bool 0"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every annotation query."""
    found = [
        (f"panel {p['title']!r} target {t['refId']}", t["expr"])
        for p in _panels(dashboard)
        for t in p.get("targets", [])
    ]
    found += [
        (f"annotation {a['name']!r}", a["expr"])
        for a in dashboard["annotations"]["list"]
        if "expr" in a
    ]
    return found


QUERIES = _queries(_dashboard())


@pytest.mark.parametrize("where, expr", QUERIES, ids=[w for w, _ in QUERIES])
def test_every_query_names_only_exported_spec_metrics(where, expr):
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    assert names <= EXPORTED.keys(), f"{where}: not exported: {sorted(names - EXPORTED.keys())}"
    assert {EXPORTED[n] for n in names} <= SPEC_SECTION_6 | DOCUMENTED_ADDITIONS
    assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")


@pytest.mark.parametrize("where, expr", QUERIES, ids=[w for w, _ in QUERIES])
def test_counters_are_rated_and_quantiles_use_buckets_by_le(where, expr):
    names = metric_names(expr)
    if any(n.endswith(("_total", "_bucket", "_count", "_sum")) for n in names):
        assert re.search(r"\b(rate|increase|changes)\(", expr), f"{where}: raw counter"
    if "histogram_quantile" in expr:
        assert all(n.endswith("_bucket") for n in names), where
        assert re.search(r"by \((le|[^)]*\ble)\b", expr), f"{where}: quantile without `le`"


@pytest.mark.parametrize("where, expr", QUERIES, ids=[w for w, _ in QUERIES])
def test_no_query_selects_an_empty_route_or_upstream(where, expr):
    """Requests refused before a route or upstream was chosen carry the label `none`
    (gateway.observe.metrics.NO_NAME), never an empty string: a query for "" would match nothing."""
    assert not re.search(r'\b(route|upstream)\s*=~?\s*""', expr), where


def test_template_variable_queries_name_exported_metrics():
    variables = _dashboard()["templating"]["list"]
    queries = [v["definition"] for v in variables if v["type"] == "query"]
    assert queries
    for query in queries:
        metric = re.fullmatch(r"label_values\((\w+)(\{.*\})?, *\w+\)", query)
        assert metric and metric.group(1) in EXPORTED, query


def test_the_datasource_is_a_template_variable_used_everywhere():
    dashboard = _dashboard()
    (datasource,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert (datasource["name"], datasource["query"]) == ("DS_PROMETHEUS", "prometheus")
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    assert "__inputs" not in dashboard  # usable as provisioned, with no import step


def test_panels_have_unique_ids_and_do_not_overlap():
    panels = _panels(_dashboard())
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, panel["title"]
        columns, rows = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in columns for y in rows}
        assert not mine & cells, f"{panel['title']!r} overlaps another panel"
        cells |= mine


def test_every_spec_metric_is_on_the_dashboard():
    used = {EXPORTED[n] for _, expr in QUERIES for n in metric_names(expr)}
    assert used >= SPEC_SECTION_6, sorted(SPEC_SECTION_6 - used)


def test_documented_additions_are_exported_and_in_the_readme():
    readme = (DASHBOARD.parents[3] / "README.md").read_text(encoding="utf-8")
    for name in DOCUMENTED_ADDITIONS:
        assert name in EXPORTED.values(), f"{name} is not exported"
        assert re.search(rf"`{name}[`{{]", readme), f"{name} is not documented in the README"


def _titled(fragment: str) -> dict:
    (panel,) = [p for p in _panels(_dashboard()) if fragment in p["title"]]
    return panel


@pytest.mark.parametrize(
    "title, metric",
    [
        ("Requests per second by route and status", "streamgate_requests_total"),
        ("Chunk gap p99", "streamgate_chunk_gap_seconds_bucket"),
        ("Active streams", "streamgate_active_streams"),
        ("Queue depth", "streamgate_concurrency_waiting"),
        ("Queue wait", "streamgate_queue_wait_seconds_bucket"),
        ("Rate-limited", "streamgate_rate_limited_total"),
        ("Retries per second", "streamgate_retries_total"),
        ("Client disconnects", "streamgate_client_disconnects_total"),
        ("Endpoint health", "streamgate_endpoint_healthy"),
        ("Worker restarts", "streamgate_worker_restarts_total"),
        ("Tokens per second by route", "streamgate_tokens_total"),
        ("Output tokens per second per stream", "streamgate_output_tokens_per_second_bucket"),
        ("Shared state (Redis) up", "streamgate_shared_state_up"),
        ("tokens reserved vs settled", "streamgate_token_budget_reserved_tokens_total"),
        ("Token budget refusals", "streamgate_token_budget_refused_total"),
        ("Streams ended by a token cap", 'kind="token_cap_exceeded"'),
        ("Replicas with shared state degraded", "streamgate_shared_state_up"),
        ("Active WebSocket sessions", "streamgate_active_websocket_sessions"),
        ("WebSocket session endings", "streamgate_websocket_sessions_total"),
        ("WebSocket messages per second", "streamgate_websocket_messages_total"),
    ],
)
def test_each_promised_panel_is_there(title, metric):
    panel = _titled(title)
    exprs = " ".join(t["expr"] for t in panel["targets"])
    assert metric in exprs
    assert panel["description"]


def test_time_to_first_chunk_shows_p50_p95_p99():
    panel = _titled("Time to first chunk p50")
    quantiles = [re.match(r"histogram_quantile\(([\d.]+),", t["expr"]) for t in panel["targets"]]
    assert [q.group(1) for q in quantiles if q] == ["0.5", "0.95", "0.99"]
    bucket = "streamgate_time_to_first_chunk_seconds_bucket"
    assert all(bucket in t["expr"] for t in panel["targets"])


def test_concurrency_shows_in_use_against_capacity():
    exprs = [t["expr"] for t in _titled("in use vs capacity")["targets"]]
    assert any("streamgate_concurrency_in_use" in e for e in exprs)
    assert any("streamgate_concurrency_capacity" in e for e in exprs)


def test_the_token_budget_row_shows_reserved_against_settled():
    row = _titled("Token budgets:")
    assert row["type"] == "row"
    exprs = [t["expr"] for t in _titled("tokens reserved vs settled")["targets"]]
    assert any("streamgate_token_budget_reserved_tokens_total" in e for e in exprs)
    assert any("streamgate_token_budget_settled_tokens_total" in e for e in exprs)
    row_panels = [p for p in _panels(_dashboard()) if p["gridPos"]["y"] == row["gridPos"]["y"] + 1]
    assert len(row_panels) == 4
