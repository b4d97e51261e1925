"""Routing: ordered first-match rules on path, prefix, methods, headers and the body's model."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.loader import load_config_text
from gateway.engine.routing import RequestFacts, Router

ROUTES = """
upstreams:
  u: {kind: http, endpoints: [{url: "http://127.0.0.1:1"}]}
routes:
  - {name: acme-llama, upstream: u, match: {path: /v1/chat/completions, model: "llama-*", headers: {X-Tenant: acme}}}
  - {name: llama, upstream: u, match: {path: /v1/chat/completions, model: "llama-*"}}
  - {name: chat-post, upstream: u, match: {path: /v1/chat/completions, methods: [POST]}}
  - {name: v1-models, upstream: u, match: {path_prefix: /v1/models}}
  - {name: v1, upstream: u, match: {path_prefix: /v1/}}
  - {name: anything-get, upstream: u, match: {methods: [GET]}}
"""


def facts(method="POST", path="/v1/chat/completions", headers=None, model=None) -> RequestFacts:
    return RequestFacts(method, path, CIMultiDictProxy(CIMultiDict(headers or {})), model)


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(load_config_text(ROUTES, "routes.yaml", env={}).routes)


@pytest.mark.parametrize(
    "request_facts, expected",
    [
        (facts(model="llama-3", headers={"x-tenant": "acme"}), "acme-llama"),
        (facts(model="llama-3", headers={"X-TENANT": "acme"}), "acme-llama"),  # names: any case
        (facts(model="llama-3", headers={"x-tenant": "ACME"}), "llama"),  # values: exact
        (facts(model="llama-3"), "llama"),
        (facts(model="gpt-4o"), "chat-post"),
        (facts(model=None), "chat-post"),  # a body without "model" never matches a model glob
        (facts(method="PUT"), "v1"),  # not POST: falls to the prefix route
        (facts(method="GET", path="/v1/models"), "v1-models"),
        (facts(method="GET", path="/v1/models/x"), "v1-models"),
        (facts(method="GET", path="/v1/modelsx"), "v1-models"),  # prefixes are string prefixes
        (facts(method="GET", path="/v2/other"), "anything-get"),
        (facts(method="POST", path="/v2/other"), None),
        (facts(method="POST", path="/v1"), None),  # shorter than the prefix /v1/
    ],
    ids=[
        "all-fields",
        "header-name-case",
        "header-value-exact",
        "model-glob",
        "model-no-glob",
        "no-model",
        "method-falls-through",
        "prefix",
        "prefix-deeper",
        "prefix-is-string",
        "no-path-route",
        "no-match",
        "shorter-than-prefix",
    ],
)
def test_first_matching_route_in_file_order_wins(router, request_facts, expected):
    route = router.match(request_facts)
    assert (route.name if route else None) == expected


def test_mismatch_says_why(router):
    reasons = [cr.mismatch(facts(method="GET", path="/v2")) for cr in router.compiled]
    assert reasons == [
        "path '/v2' is not '/v1/chat/completions'",
        "path '/v2' is not '/v1/chat/completions'",
        "path '/v2' is not '/v1/chat/completions'",
        "path '/v2' does not start with '/v1/models'",
        "path '/v2' does not start with '/v1/'",
        None,
    ]


def _many_routes(n: int) -> Router:
    lines = ["upstreams:", '  u: {kind: http, endpoints: [{url: "http://127.0.0.1:1"}]}', "routes:"]
    for i in range(n - 2):
        lines.append(
            f"  - {{name: r{i}, upstream: u, match: {{path: /t{i}/chat, model: 'm{i}-*'}}}}"
        )
    lines.append("  - {name: prefix, upstream: u, match: {path_prefix: /tenant/}}")
    lines.append("  - {name: last, upstream: u, match: {path: /v1/chat/completions}}")
    return Router(load_config_text("\n".join(lines), "many.yaml", env={}).routes)


def test_matching_checks_only_the_routes_indexed_under_the_path_and_model():
    """Matching cost stays flat as routes grow: a request's candidates are the routes indexed
    under its own path and the literal start of its model, never a scan of the table. The
    time it takes is measured by loadtests/, not here."""
    small, large = _many_routes(10), _many_routes(1000)
    assert large.match(facts(model="x")).name == "last"
    assert large.match(facts(path="/t500/chat", model="m500-a")).name == "r500"
    assert large.match(facts(path="/tenant/7/chat")).name == "prefix"
    for router in (small, large):
        assert [cr.route.name for cr in router._index("/v1/chat/completions").candidates("x")] == ["last"]
        assert [cr.route.name for cr in router._index("/t5/chat").candidates("m5-x")] == ["r5"]
    tenants = _tenant_routes(1000)
    assert tenants.match(facts(model="tenant-500-llama")).name == "t500"
    assert tenants.match(facts(model="other")).name == "wildcard-first"
    names = [cr.route.name for cr in tenants._index("/v1/chat/completions").candidates("tenant-7-x")]
    assert names == ["t7", "wildcard-first", "fallback"]


def _tenant_routes(n: int) -> Router:
    """n routes on one path told apart by model, then a wildcard-first glob and a catch-all."""
    lines = ["upstreams:", '  u: {kind: http, endpoints: [{url: "http://127.0.0.1:1"}]}', "routes:"]
    for i in range(n):
        lines.append(f"  - {{name: t{i}, upstream: u, match: {{path_prefix: /v1/, model: 'tenant-{i}-*'}}}}")
    lines.append("  - {name: wildcard-first, upstream: u, match: {path_prefix: /v1/, model: '*'}}")
    lines.append("  - {name: fallback, upstream: u, match: {path_prefix: /v1/}}")
    return Router(load_config_text("\n".join(lines), "tenants.yaml", env={}).routes)


@pytest.mark.parametrize(
    "model, expected",
    [("llama-3", "glob"), ("llama", "literal"), ("llamb", "class"), ("x-llama", "suffix"), (None, "any")],
)
def test_model_globs_of_every_shape_keep_file_order(model, expected):
    config = """
upstreams:
  u: {kind: http, endpoints: [{url: "http://127.0.0.1:1"}]}
routes:
  - {name: glob, upstream: u, match: {model: "llama-*"}}
  - {name: literal, upstream: u, match: {model: "llama"}}
  - {name: class, upstream: u, match: {model: "llam[ab]"}}
  - {name: suffix, upstream: u, match: {model: "*-llama"}}
  - {name: any, upstream: u, match: {}}
"""
    router = Router(load_config_text(config, "shapes.yaml", env={}).routes)
    assert router.match(facts(model=model)).name == expected


def test_the_candidate_cache_is_bounded(router):
    for i in range(10_000):
        router.match(facts(path=f"/v1/x{i}"))
    assert len(router._by_path) <= 4096
