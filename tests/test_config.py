"""The config file, specified: what loads and to what, and every error with its exact position.

Error cases are tables of (YAML, expected `FILE:LINE:COL: path: message` lines); positions are
1-based and point at the offending value, or at the key when the key itself is wrong.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from gateway.config.loader import load_config, load_config_text
from gateway.config.model import (
    AdminConfig,
    ConcurrencyLimit,
    EjectConfig,
    EndpointConfig,
    GatewayConfig,
    HealthConfig,
    HttpUpstream,
    LimitsConfig,
    RateLimit,
    ReadyConfig,
    RestartConfig,
    ServerConfig,
    StateConfig,
    TelemetryConfig,
    TracingConfig,
    Weights,
    WorkerPoolUpstream,
)
from gateway.config.routes import (
    Backoff,
    BufferConfig,
    Fallback,
    RetryPolicy,
    Route,
    RouteMatch,
    Timeouts,
)
from gateway.errors import ConfigErrors

REPO = Path(__file__).resolve().parent.parent
SOURCE = "gw.yaml"

# Section 3 of SPEC.md, verbatim.
SKETCH = """\
server:
  listen: 0.0.0.0:8080
  max_request_body: 4MiB
  shutdown_grace: 5m               # long streams deserve minutes, not seconds
admin:
  listen: 127.0.0.1:9901          # /metrics /healthz /readyz /admin/*
state:
  backend: memory                  # memory | redis
  redis_url: ${REDIS_URL:-redis://127.0.0.1:6379/0}
  on_error: fail_open              # fail_open | fail_closed when redis is unreachable
  lease_ttl: 10s                   # global concurrency units of a dead replica return after this
telemetry:
  tracing: {exporter: none, endpoint: null, sample_ratio: 1.0}   # none | console | otlp
  access_log: json                 # json | off

upstreams:
  local-gpu:
    kind: worker_pool
    command: ["streamgate", "fake-llm", "--port", "{port}"]
    gpus: [0, 1]                   # one worker per entry; CUDA_VISIBLE_DEVICES={gpu}; or count: N
    env: {}
    ready: {path: /health, timeout: 120s}
    restart: {backoff: 1s, max_backoff: 30s}
  hosted:
    kind: http
    endpoints:
      - {url: "https://api.example.com", weight: 1}
    headers: {Authorization: "Bearer ${HOSTED_API_KEY}"}
    balance: least_outstanding     # round_robin | least_outstanding | weighted
    health: {path: /health, interval: 5s, unhealthy_after: 3}
    eject: {consecutive_failures: 5, cooldown: 30s}
    max_connections: 256

limits:
  concurrency:
    gpu-slots:
      capacity: 64                 # units
      weights: {stream: 3, unary: 1}
      max_queue: 1000
      scope: local                 # local | global (shared through redis, leased)
  rate:
    per-key:
      rate: 60
      per: 60s
      key: header:authorization    # route | client_ip | header:NAME
      scope: local                 # local (aiolimiter) | global (redis)

routes:
  - name: chat-local
    match:
      path: /v1/chat/completions   # exact; or path_prefix: /v1/
      methods: [POST]
      model: "llama-*"             # glob on the JSON body's "model"
      headers: {x-tenant: acme}
    upstream: local-gpu
    fallbacks:                     # tried in order once the primary gives up
      - hosted                     # a name, or
      - {upstream: hosted, model: "gpt-4o-mini"}   # rewrite the body's "model" for this hop
    limits: [per-key, gpu-slots]
    timeouts: {queue: 5s, connect: 2s, first_chunk: 30s, chunk_gap: 30s, total: 10m, slow_client: 30s}
    retry:
      attempts: 3                  # tries on the same upstream (its endpoints), before fallbacks
      on: [connect_error, reset, empty_body, 429, 500, 502, 503, 504]
      fallback_on: [first_chunk_timeout, context_length_exceeded]  # skip straight to the next fallback
      backoff: {base: 100ms, max: 2s, jitter: true}
    buffer: {chunks: 64, bytes: 1MiB}
    keepalive: 15s
"""  # noqa: E501 -- kept verbatim

MINIMAL = """\
upstreams:
  a:
    endpoints: [{url: "http://127.0.0.1:9000"}]
routes:
  - {name: r, upstream: a}
"""


def load(text: str, env: dict[str, str] | None = None) -> GatewayConfig:
    return load_config_text(textwrap.dedent(text), SOURCE, env or {})


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as caught:
        load(text, env)
    return [str(e) for e in caught.value.errors]


# ----------------------------------------------------------------- what loads


def test_spec_sketch_loads_to_the_documented_objects():
    cfg = load_config_text(SKETCH, "config/gateway.yaml", {"HOSTED_API_KEY": "sk-test"})

    assert cfg == GatewayConfig(
        server=ServerConfig(
            listen=("0.0.0.0", 8080), max_request_body=4 * 2**20, shutdown_grace=300.0
        ),
        admin=AdminConfig(listen=("127.0.0.1", 9901)),
        state=StateConfig(
            backend="memory",
            redis_url="redis://127.0.0.1:6379/0",
            on_error="fail_open",
            lease_ttl=10.0,
        ),
        telemetry=TelemetryConfig(
            tracing=TracingConfig(exporter="none", endpoint=None, sample_ratio=1.0),
            access_log="json",
        ),
        upstreams={
            "local-gpu": WorkerPoolUpstream(
                command=("streamgate", "fake-llm", "--port", "{port}"),
                gpus=("0", "1"),
                env={},
                ready=ReadyConfig(path="/health", timeout=120.0),
                restart=RestartConfig(backoff=1.0, max_backoff=30.0),
            ),
            "hosted": HttpUpstream(
                endpoints=(EndpointConfig(url="https://api.example.com", weight=1),),
                headers={"Authorization": "Bearer sk-test"},
                balance="least_outstanding",
                health=HealthConfig(path="/health", interval=5.0, unhealthy_after=3),
                eject=EjectConfig(consecutive_failures=5, cooldown=30.0),
                max_connections=256,
            ),
        },
        limits=LimitsConfig(
            concurrency={
                "gpu-slots": ConcurrencyLimit(
                    capacity=64, weights=Weights(stream=3, unary=1), max_queue=1000, scope="local"
                )
            },
            rate={
                "per-key": RateLimit(rate=60.0, per=60.0, key="header:authorization", scope="local")
            },
        ),
        routes=(
            Route(
                name="chat-local",
                match=RouteMatch(
                    path="/v1/chat/completions",
                    methods=("POST",),
                    model="llama-*",
                    headers={"x-tenant": "acme"},
                ),
                upstream="local-gpu",
                fallbacks=(Fallback("hosted"), Fallback("hosted", model="gpt-4o-mini")),
                limits=("per-key", "gpu-slots"),
                timeouts=Timeouts(
                    queue=5.0,
                    connect=2.0,
                    first_chunk=30.0,
                    chunk_gap=30.0,
                    total=600.0,
                    slow_client=30.0,
                ),
                retry=RetryPolicy(
                    attempts=3,
                    on=("connect_error", "reset", "empty_body", "429", "500", "502", "503", "504"),
                    fallback_on=("first_chunk_timeout", "context_length_exceeded"),
                    backoff=Backoff(base=0.1, max=2.0, jitter=True),
                ),
                buffer=BufferConfig(chunks=64, bytes=2**20),
                keepalive=15.0,
            ),
        ),
        source="config/gateway.yaml",
    )


def test_minimal_config_gets_every_default():
    assert load(MINIMAL) == GatewayConfig(
        upstreams={"a": HttpUpstream(endpoints=(EndpointConfig(url="http://127.0.0.1:9000"),))},
        routes=(Route(name="r", upstream="a"),),
        source=SOURCE,
    )


def test_loaded_config_is_frozen_all_the_way_down():
    cfg = load(SKETCH, {"HOSTED_API_KEY": "k"})

    for mapping in (
        cfg.upstreams,
        cfg.upstreams["hosted"].headers,
        cfg.limits.rate,
        cfg.limits.concurrency,
        cfg.routes[0].match.headers,
    ):
        assert isinstance(mapping, MappingProxyType)
    assert isinstance(cfg.routes, tuple)
    assert isinstance(cfg.routes[0].retry.on, tuple)


def test_load_config_reads_a_file_and_records_its_path(tmp_path):
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL)

    assert load_config(str(path), env={}).source == str(path)


def test_load_config_reports_an_unreadable_file_in_the_usual_format(tmp_path):
    missing = str(tmp_path / "nope.yaml")

    with pytest.raises(ConfigErrors) as caught:
        load_config(missing, env={})

    assert [str(e) for e in caught.value.errors] == [
        f"{missing}:1:1: cannot read it: No such file or directory"
    ]


def _with_server(value: str) -> str:
    return f"server: {value}\n" + MINIMAL


UNITS = [  # (server block as written, field, value held)
    ("{shutdown_grace: 250ms}", "shutdown_grace", 0.25),
    ("{shutdown_grace: 100ms}", "shutdown_grace", 0.1),
    ("{shutdown_grace: 5s}", "shutdown_grace", 5.0),
    ("{shutdown_grace: 1.5s}", "shutdown_grace", 1.5),
    ("{shutdown_grace: 2m}", "shutdown_grace", 120.0),
    ("{shutdown_grace: 1h}", "shutdown_grace", 3600.0),
    ("{shutdown_grace: 7}", "shutdown_grace", 7.0),
    ("{shutdown_grace: 0.5}", "shutdown_grace", 0.5),
    ("{shutdown_grace: 0s}", "shutdown_grace", 0.0),
    ("{max_request_body: 512KiB}", "max_request_body", 512 * 1024),
    ("{max_request_body: 4MiB}", "max_request_body", 4 * 2**20),
    ("{max_request_body: 1.5MiB}", "max_request_body", 3 * 2**19),
    ("{max_request_body: 1GiB}", "max_request_body", 2**30),
    ("{max_request_body: 2KB}", "max_request_body", 2000),
    ("{max_request_body: 3MB}", "max_request_body", 3_000_000),
    ("{max_request_body: 1GB}", "max_request_body", 10**9),
    ("{max_request_body: 100B}", "max_request_body", 100),
    ("{max_request_body: 4096}", "max_request_body", 4096),
    ("{listen: 127.0.0.1:9000}", "listen", ("127.0.0.1", 9000)),
    ("{listen: '[::1]:8080'}", "listen", ("::1", 8080)),
    ("{listen: ':8080'}", "listen", ("0.0.0.0", 8080)),
    ("{listen: 'localhost:0'}", "listen", ("localhost", 0)),
]


@pytest.mark.parametrize(("written", "field", "expected"), UNITS, ids=[u[0] for u in UNITS])
def test_units_are_parsed_into_seconds_bytes_and_addresses(written, field, expected):
    assert getattr(load(_with_server(written)).server, field) == expected


def test_listen_with_a_bare_port_in_block_style():
    assert load("server:\n  listen: :9000\n" + MINIMAL).server.listen == ("0.0.0.0", 9000)


# ----------------------------------------------------------------- normal forms


NORMALIZING = """\
upstreams:
  a: {endpoints: [{url: "http://h"}]}
  pool: {command: [w, "{port}"], count: 2}
limits:
  rate:
    by-key: {rate: 1, key: "header:X-API-Key"}
routes:
  - name: r
    upstream: a
    match: {methods: [post, Get], headers: {X-Tenant: acme}}
    fallbacks: [pool, {upstream: a, model: small}]
    limits: [by-key]
    retry: {on: [429, reset, rate_limit_exceeded]}
"""


def test_values_are_stored_in_normal_form():
    cfg = load(NORMALIZING)
    route = cfg.routes[0]

    assert route.match.methods == ("POST", "GET")
    assert dict(route.match.headers) == {"x-tenant": "acme"}
    assert cfg.limits.rate["by-key"].key == "header:x-api-key"
    assert route.fallbacks == (Fallback("pool"), Fallback("a", model="small"))
    assert route.retry.on == ("429", "reset", "rate_limit_exceeded")


def test_upstream_kind_is_inferred_from_its_required_keys():
    cfg = load(NORMALIZING)

    assert isinstance(cfg.upstreams["a"], HttpUpstream)
    assert isinstance(cfg.upstreams["pool"], WorkerPoolUpstream)
    assert cfg.upstreams["pool"].count == 2


# ----------------------------------------------------------------- YAML 1.2 booleans


def test_on_and_off_are_plain_strings():
    cfg = load(
        """\
        telemetry: {access_log: off}
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - name: r
            upstream: a
            retry:
              on: [reset]
              backoff: {jitter: false}
        """
    )

    assert cfg.telemetry.access_log == "off"
    assert cfg.routes[0].retry.on == ("reset",)
    assert cfg.routes[0].retry.backoff.jitter is False


def _with_jitter(written: str) -> str:
    route = "{name: r, upstream: a, retry: {backoff: {jitter: JITTER}}}"
    return MINIMAL.replace("{name: r, upstream: a}", route.replace("JITTER", written))


@pytest.mark.parametrize("written", ["true", "True", "TRUE"])
def test_true_in_any_case_is_a_boolean(written):
    cfg = load(_with_jitter(written))

    assert cfg.routes[0].retry.backoff.jitter is True


@pytest.mark.parametrize("written", ["yes", "no", "on", "off", "y", "n"])
def test_yaml_1_1_booleans_are_not_booleans(written):
    assert errors_of(_with_jitter(written)) == [
        f"gw.yaml:5:54: routes[0].retry.backoff.jitter: expected true or false, got '{written}'"
    ]


def test_pyyaml_safe_loader_is_left_alone():
    assert yaml.safe_load("a: on") == {"a": True}


# ----------------------------------------------------------------- ${VAR} interpolation


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("0.0.0.0", 8080)),
        ({"LISTEN": ""}, ("0.0.0.0", 8080)),
        ({"LISTEN": "127.0.0.1:7000"}, ("127.0.0.1", 7000)),
    ],
    ids=["unset-uses-default", "empty-uses-default", "set-wins"],
)
def test_interpolation_with_a_default(env, expected):
    cfg = load("server:\n  listen: ${LISTEN:-0.0.0.0:8080}\n" + MINIMAL, env)

    assert cfg.server.listen == expected


@pytest.mark.parametrize(
    "endpoints",
    [
        "\n    - url: http://h\n      weight: ${W:-4}",
        ' [{url: "http://h", weight: "${W:-4}"}]',  # flow style needs quotes around ${...}
    ],
    ids=["plain", "quoted"],
)
def test_interpolated_values_are_typed_after_substitution(endpoints):
    text = f"upstreams:\n  a:\n    endpoints:{endpoints}\nroutes: [{{name: r, upstream: a}}]\n"

    assert load(text).upstreams["a"].endpoints[0].weight == 4
    assert load(text, {"W": "7"}).upstreams["a"].endpoints[0].weight == 7


def test_interpolation_inside_a_quoted_string():
    text = MINIMAL.replace("a:\n", 'a:\n    headers: {Authorization: "Bearer ${KEY}"}\n')

    assert load(text, {"KEY": "sk-1"}).upstreams["a"].headers == {"Authorization": "Bearer sk-1"}


def test_an_empty_default_on_an_optional_field_reads_as_null():
    text = "telemetry:\n  tracing:\n    endpoint: ${OTLP_ENDPOINT:-}\n" + MINIMAL

    assert load(text).telemetry.tracing.endpoint is None


def test_keys_are_not_interpolated():
    text = MINIMAL.replace("{name: r, upstream: a}", '{name: r, upstream: a, match: {headers: {"${X}": v}}}')

    assert load(text, {"X": "y"}).routes[0].match.headers == {"${x}": "v"}  # lower-cased, as names


def test_an_unset_variable_without_default_is_an_error_at_its_value():
    text = MINIMAL.replace("a:\n", 'a:\n    headers: {Authorization: "Bearer ${HOSTED_API_KEY}"}\n')

    assert errors_of(text) == [
        "gw.yaml:3:30: upstreams.a.headers.Authorization: environment variable HOSTED_API_KEY"
        " is not set (write ${HOSTED_API_KEY:-default} to give a default)"
    ]


# ----------------------------------------------------------------- errors: YAML and types


def case(id_: str, text: str, *expected: str):
    return pytest.param(textwrap.dedent(text), list(expected), id=id_)


SHAPE_ERRORS = [
    case(
        "syntax-error",
        """\
        upstreams: [a
        routes: []
        """,
        "gw.yaml:2:7: invalid YAML: expected ',' or ']', but got ':'",
    ),
    case(
        "unquoted-interpolation-in-flow-style",
        """\
        server: {listen: ${LISTEN}}
        """,
        "gw.yaml:1:19: invalid YAML: expected ',' or '}', but got '{'"
        " (inside [...] or {...}, quote values that use ${...})",
    ),
    case("empty-file", "", "gw.yaml:1:1: the file is empty"),
    case(
        "complex-key",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        ? [x]
        : 1
        """,
        "gw.yaml:3:3: keys must be plain strings",
    ),
    case("top-level-list", "- a\n", "gw.yaml:1:1: expected a mapping, got a list"),
    case(
        "duplicate-key-at-second-key",
        """\
        upstreams:
          a: {endpoints: [{url: "http://h"}]}
        routes: [{name: r, upstream: a}]
        routes: [{name: s, upstream: a}]
        """,
        "gw.yaml:4:1: routes: duplicate key 'routes' (first at line 3)",
    ),
    case(
        "duplicate-nested-key",
        """\
        upstreams:
          a: {endpoints: [{url: "http://h"}], balance: weighted, balance: round_robin}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:58: upstreams.a.balance: duplicate key 'balance' (first at line 2)",
    ),
    case(
        "unknown-key-at-key-with-suggestion",
        """\
        upstreams:
          a: {endpoints: [{url: "http://h"}]}
        routes:
          - name: r
            upstream: a
            tiemouts: {connect: 1s}
        """,
        "gw.yaml:6:5: routes[0].tiemouts: unknown key 'tiemouts' (did you mean 'timeouts'?)",
    ),
    case(
        "unknown-key-without-suggestion",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        colour: blue
        """,
        "gw.yaml:3:1: colour: unknown key 'colour'",
    ),
    case(
        "source-is-not-a-yaml-key",
        """\
        source: other.yaml
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:1: source: unknown key 'source'",
    ),
    case(
        "missing-top-level-key",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        """,
        "gw.yaml:1:1: missing required key 'routes'",
    ),
    case(
        "missing-key-at-the-mapping",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - name: r
            match: {path: /}
        """,
        "gw.yaml:3:5: routes[0]: missing required key 'upstream'",
    ),
    case(
        "integer-not-float",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}], max_connections: 1.5}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:66: upstreams.a.max_connections: expected an integer, got '1.5'",
    ),
    case(
        "integer-not-bool",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}], max_connections: true}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:66: upstreams.a.max_connections: expected an integer, got 'true'",
    ),
    case(
        "number-not-word",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        telemetry: {tracing: {sample_ratio: half}}
        """,
        "gw.yaml:3:37: telemetry.tracing.sample_ratio: expected a number, got 'half'",
    ),
    case(
        "literal-choices",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}], balance: fastest}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:58: upstreams.a.balance: expected one of round_robin, least_outstanding,"
        " weighted, got 'fastest'",
    ),
    case(
        "literal-suggestion",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}], balance: round-robin}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:58: upstreams.a.balance: expected one of round_robin, least_outstanding,"
        " weighted, got 'round-robin' (did you mean 'round_robin'?)",
    ),
    case(
        "duration-unit",
        """\
        server: {shutdown_grace: 5 sec}
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:26: server.shutdown_grace: invalid duration '5 sec'"
        " (use a number with ms, s, m or h, e.g. 250ms, 5s, 2m)",
    ),
    case(
        "duration-negative",
        """\
        server: {shutdown_grace: -5s}
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:26: server.shutdown_grace: duration must not be negative, got '-5s'",
    ),
    case(
        "size-unit",
        """\
        server: {max_request_body: 4mb}
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:28: server.max_request_body: invalid size '4mb' (use a whole number of"
        " bytes or a unit: B, KB, MB, GB, KiB, MiB, GiB, e.g. 512KiB, 4MiB)",
    ),
    case(
        "address-without-port",
        """\
        admin: {listen: localhost}
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:17: admin.listen: invalid address 'localhost'"
        " (use HOST:PORT, e.g. 0.0.0.0:8080, [::1]:8080 or :8080)",
    ),
    case(
        "address-port-range",
        """\
        admin: {listen: "0.0.0.0:70000"}
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:17: admin.listen: invalid address '0.0.0.0:70000' (port must be 0-65535)",
    ),
    case(
        "list-expected",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, match: {methods: POST}}
        """,
        "gw.yaml:3:45: routes[0].match.methods: expected a list, got 'POST'",
    ),
    case(
        "mapping-expected",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          name: r
        """,
        "gw.yaml:3:3: routes: expected a list, got a mapping",
    ),
    case(
        "mapping-expected-not-list",
        """\
        server: [listen]
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:9: server: expected a mapping, got a list",
    ),
    case(
        "null-for-required-string",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - name: r
            upstream:
        """,
        "gw.yaml:4:14: routes[0].upstream: expected a string, got null",
    ),
    case(
        "upstream-without-kind-or-endpoints",
        """\
        upstreams:
          a: {balance: weighted}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:6: upstreams.a: missing required key 'kind' (http or worker_pool or grpc)",
    ),
    case(
        "upstream-unknown-kind",
        """\
        upstreams:
          a: {kind: htp, endpoints: [{url: "http://h"}]}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:13: upstreams.a.kind: expected one of http, worker_pool, grpc,"
        " got 'htp' (did you mean 'http'?)",
    ),
    case(
        "key-of-the-other-kind",
        """\
        upstreams:
          a: {kind: http, endpoints: [{url: "http://h"}], gpus: [0]}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:51: upstreams.a.gpus: unknown key 'gpus'",
    ),
    case(
        "fallback-neither-name-nor-mapping",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, fallbacks: [[a]]}
        """,
        "gw.yaml:3:40: routes[0].fallbacks[0]: expected a mapping, got a list",
    ),
    case(
        "framing-unknown",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, framing: grpc}
        """,
        "gw.yaml:3:37: routes[0].framing: expected one of auto, sse, ndjson, raw, unary, truss,"
        " got 'grpc'",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SHAPE_ERRORS)
def test_shape_errors(text, expected):
    assert errors_of(text) == expected


def test_every_shape_error_is_reported_at_once():
    text = """\
        server: {listen: nowhere, shutdown_grace: soon}
        upstreams:
          a: {endpoints: [{url: "http://h", weight: heavy}], balance: random}
        routes:
          - {name: r, upstream: a, tiemouts: {}}
          - {name: s}
        """

    assert errors_of(text) == [
        "gw.yaml:1:18: server.listen: invalid address 'nowhere'"
        " (use HOST:PORT, e.g. 0.0.0.0:8080, [::1]:8080 or :8080)",
        "gw.yaml:1:43: server.shutdown_grace: invalid duration 'soon'"
        " (use a number with ms, s, m or h, e.g. 250ms, 5s, 2m)",
        "gw.yaml:3:45: upstreams.a.endpoints[0].weight: expected an integer, got 'heavy'",
        "gw.yaml:3:63: upstreams.a.balance: expected one of round_robin, least_outstanding,"
        " weighted, got 'random'",
        "gw.yaml:5:28: routes[0].tiemouts: unknown key 'tiemouts' (did you mean 'timeouts'?)",
        "gw.yaml:6:5: routes[1]: missing required key 'upstream'",
    ]


# ----------------------------------------------------------------- errors: meaning

# Each document below is the minimal config with one thing wrong.
SEMANTIC_ERRORS = [
    case(
        "unknown-upstream",
        """\
        upstreams: {local-gpu: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: local-gpus}
        """,
        "gw.yaml:3:25: routes[0].upstream: unknown upstream 'local-gpus'"
        " (did you mean 'local-gpu'?)",
    ),
    case(
        "unknown-fallback-by-name",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, fallbacks: [a, hosted]}
        """,
        "gw.yaml:3:43: routes[0].fallbacks[1].upstream: unknown upstream 'hosted'",
    ),
    case(
        "unknown-fallback-in-mapping",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, fallbacks: [{upstream: b, model: m}]}
        """,
        "gw.yaml:3:51: routes[0].fallbacks[0].upstream: unknown upstream 'b'",
    ),
    case(
        "unknown-limit",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {rate: {per-key: {rate: 1}}}
        routes:
          - {name: r, upstream: a, limits: [per-kye]}
        """,
        "gw.yaml:4:37: routes[0].limits[0]: unknown limit 'per-kye' (did you mean 'per-key'?)",
    ),
    case(
        "limit-listed-twice",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {rate: {per-key: {rate: 1}}}
        routes:
          - {name: r, upstream: a, limits: [per-key, per-key]}
        """,
        "gw.yaml:4:46: routes[0].limits[1]: limit 'per-key' is listed twice",
    ),
    case(
        "limit-name-in-both-kinds",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits:
          concurrency: {slots: {capacity: 4}}
          rate: {slots: {rate: 1}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:4:10: limits.rate.slots: limit 'slots' is also defined in limits.concurrency"
        " (names must be unique)",
    ),
    case(
        "duplicate-route-name",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a}
          - {name: r, upstream: a}
        """,
        "gw.yaml:4:12: routes[1].name: duplicate route name 'r' (also routes[0])",
    ),
    case(
        "no-routes",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: []
        """,
        "gw.yaml:2:9: routes: define at least one route",
    ),
    case(
        "no-upstreams",
        """\
        upstreams: {}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:12: upstreams: define at least one upstream",
        "gw.yaml:2:30: routes[0].upstream: unknown upstream 'a'",
    ),
    case(
        "path-and-prefix",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, match: {path: /v1/x, path_prefix: /v1/}}
        """,
        "gw.yaml:3:62: routes[0].match.path_prefix: set either path or path_prefix, not both",
    ),
    case(
        "relative-path",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, match: {path_prefix: v1/}}
        """,
        "gw.yaml:3:49: routes[0].match.path_prefix: must start with '/', got 'v1/'",
    ),
    case(
        "no-methods",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, match: {methods: []}}
        """,
        "gw.yaml:3:45: routes[0].match.methods: must not be empty"
        " (leave it out to match any method)",
    ),
    case(
        "http-without-endpoints",
        """\
        upstreams: {a: {kind: http, endpoints: []}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:40: upstreams.a.endpoints: list at least one endpoint",
    ),
    case(
        "endpoint-scheme",
        """\
        upstreams: {a: {endpoints: [{url: "ftp://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:35: upstreams.a.endpoints[0].url: invalid url 'ftp://h'"
        " (use http://, https://, ws:// or wss:// and a host)",
    ),
    case(
        "endpoint-host",
        """\
        upstreams: {a: {endpoints: [{url: "http:///v1"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:35: upstreams.a.endpoints[0].url: invalid url 'http:///v1'"
        " (use http://, https://, ws:// or wss:// and a host)",
    ),
    case(
        "endpoint-weight",
        """\
        upstreams: {a: {endpoints: [{url: "http://h", weight: 0}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:55: upstreams.a.endpoints[0].weight: must be at least 1, got 0",
    ),
    case(
        "max-connections",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}], max_connections: 0}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:66: upstreams.a.max_connections: must be at least 1, got 0",
    ),
    case(
        "pool-without-gpus-or-count",
        """\
        upstreams:
          p: {kind: worker_pool, command: [w, "{port}"]}
        routes: [{name: r, upstream: p}]
        """,
        "gw.yaml:2:6: upstreams.p: set one of 'gpus' or 'count'",
    ),
    case(
        "pool-with-gpus-and-count",
        """\
        upstreams:
          p: {command: [w, "{port}"], gpus: [0], count: 1}
        routes: [{name: r, upstream: p}]
        """,
        "gw.yaml:2:49: upstreams.p.count: set either 'gpus' or 'count', not both",
    ),
    case(
        "pool-count",
        """\
        upstreams:
          p: {command: [w, "{port}"], count: 0}
        routes: [{name: r, upstream: p}]
        """,
        "gw.yaml:2:38: upstreams.p.count: must be at least 1, got 0",
    ),
    case(
        "pool-empty-command",
        """\
        upstreams:
          p: {command: [], count: 1}
        routes: [{name: r, upstream: p}]
        """,
        "gw.yaml:2:16: upstreams.p.command: must not be empty",
    ),
    case(
        "pool-command-without-port",
        """\
        upstreams:
          p: {command: [w, --port, "8000"], count: 1}
        routes: [{name: r, upstream: p}]
        """,
        "gw.yaml:2:16: upstreams.p.command: must contain {port} (each worker gets its own port)",
    ),
    case(
        "capacity",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {concurrency: {slots: {capacity: 0}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:42: limits.concurrency.slots.capacity: must be at least 1, got 0",
    ),
    case(
        "concurrency-weight",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {concurrency: {slots: {capacity: 4, weights: {unary: 0}}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:62: limits.concurrency.slots.weights.unary: must be at least 1, got 0",
    ),
    case(
        "weight-above-capacity",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {concurrency: {slots: {capacity: 4, weights: {stream: 5}}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:63: limits.concurrency.slots.weights.stream: weight 5 is larger than"
        " capacity 4 (it could never be admitted)",
    ),
    case(
        "max-queue",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {concurrency: {slots: {capacity: 4, max_queue: -1}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:56: limits.concurrency.slots.max_queue: must be at least 0, got -1",
    ),
    case(
        "rate",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {rate: {k: {rate: 0}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:27: limits.rate.k.rate: must be greater than 0, got 0",
    ),
    case(
        "rate-per",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {rate: {k: {rate: 1, per: 0s}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:35: limits.rate.k.per: must be greater than 0, got 0s",
    ),
    case(
        "rate-key",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {rate: {k: {rate: 1, key: ip}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:35: limits.rate.k.key: invalid key 'ip' (use route, client_ip or header:NAME)",
    ),
    case(
        "rate-key-suggestion",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {rate: {k: {rate: 1, key: client-ip}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:35: limits.rate.k.key: invalid key 'client-ip' (did you mean 'client_ip'?)",
    ),
    case(
        "rate-key-header-without-name",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {rate: {k: {rate: 1, key: "header:"}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:35: limits.rate.k.key: invalid key 'header:'"
        " (use route, client_ip or header:NAME)",
    ),
    case(
        "global-scope-needs-redis",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        limits: {rate: {k: {rate: 1, scope: global}}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:2:37: limits.rate.k.scope: scope global needs state.backend: redis"
        " (memory state is per replica)",
    ),
    case(
        "retry-attempts",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, retry: {attempts: 0}}
        """,
        "gw.yaml:3:46: routes[0].retry.attempts: must be at least 1, got 0",
    ),
    case(
        "retry-condition-typo",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, retry: {on: [conect_error, context_length_exceeded]}}
        """,
        "gw.yaml:3:41: routes[0].retry.on[0]: unknown condition 'conect_error'"
        " (did you mean 'connect_error'?)",
    ),
    case(
        "retry-after-commit-point",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, retry: {fallback_on: [chunk_gap_timeout]}}
        """,
        "gw.yaml:3:50: routes[0].retry.fallback_on[0]: chunk_gap_timeout cannot be retried:"
        " it happens after the commit point, and after the commit point there is never a retry",
    ),
    case(
        "retry-status-range",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, retry: {on: [429, 600]}}
        """,
        "gw.yaml:3:46: routes[0].retry.on[1]: status code 600 is out of range 100-599",
    ),
    case(
        "backoff-max-below-base",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, retry: {backoff: {base: 1s, max: 500ms}}}
        """,
        "gw.yaml:3:61: routes[0].retry.backoff.max: must be at least backoff.base (1s), got 0.5s",
    ),
    case(
        "timeout-zero",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, timeouts: {first_chunk: 0s}}
        """,
        "gw.yaml:3:52: routes[0].timeouts.first_chunk: must be greater than 0, got 0s",
    ),
    case(
        "buffer",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, buffer: {chunks: 0, bytes: 0}}
        """,
        "gw.yaml:3:45: routes[0].buffer.chunks: must be at least 1, got 0",
        "gw.yaml:3:55: routes[0].buffer.bytes: must be at least 1, got 0",
    ),
    case(
        "keepalive",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, keepalive: 0s}
        """,
        "gw.yaml:3:39: routes[0].keepalive: must be greater than 0, got 0s",
    ),
    case(
        "footer-without-truss",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, framing: {kind: sse, require_footer: true}}
        """,
        "gw.yaml:3:65: routes[0].framing.require_footer: only a truss framing has a footer"
        " (this route's is sse)",
    ),
    case(
        "answer-end-without-fields",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, websocket_upstream: {answer_end: match}}
        """,
        "gw.yaml:3:61: routes[0].websocket_upstream.answer_end.match:"
        " name at least one field the end message has",
    ),
    case(
        "bridge-of-a-websocket-route",
        """\
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes:
          - {name: r, upstream: a, websocket: {}, websocket_upstream: {}}
        """,
        "gw.yaml:3:43: routes[0].websocket_upstream: a websocket route relays or bridges its"
        " sessions itself; drop one of the two",
    ),
    case(
        "sample-ratio",
        """\
        telemetry: {tracing: {sample_ratio: 1.5}}
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:37: telemetry.tracing.sample_ratio: must be between 0 and 1, got 1.5",
    ),
    case(
        "otlp-needs-endpoint",
        """\
        telemetry: {tracing: {exporter: otlp}}
        upstreams: {a: {endpoints: [{url: "http://h"}]}}
        routes: [{name: r, upstream: a}]
        """,
        "gw.yaml:1:33: telemetry.tracing.exporter: exporter otlp needs an endpoint",
    ),
]


@pytest.mark.parametrize(("text", "expected"), SEMANTIC_ERRORS)
def test_semantic_errors(text, expected):
    assert errors_of(text) == expected


def test_every_semantic_error_is_reported_at_once_in_file_order():
    text = """\
        upstreams:
          a: {endpoints: [{url: "http://h", weight: 0}]}
        limits: {rate: {k: {rate: 1, scope: global}}}
        routes:
          - {name: r, upstream: b, limits: [kk]}
          - {name: r, upstream: a, fallbacks: [c]}
        """

    assert errors_of(text) == [
        "gw.yaml:2:45: upstreams.a.endpoints[0].weight: must be at least 1, got 0",
        "gw.yaml:3:37: limits.rate.k.scope: scope global needs state.backend: redis"
        " (memory state is per replica)",
        "gw.yaml:5:25: routes[0].upstream: unknown upstream 'b'",
        "gw.yaml:5:37: routes[0].limits[0]: unknown limit 'kk' (did you mean 'k'?)",
        "gw.yaml:6:12: routes[1].name: duplicate route name 'r' (also routes[0])",
        "gw.yaml:6:40: routes[1].fallbacks[0].upstream: unknown upstream 'c'",
    ]


def test_global_scope_is_fine_with_redis_state():
    text = "state: {backend: redis}\nlimits: {concurrency: {s: {capacity: 2, scope: global}}}\n"

    assert load(text + MINIMAL).limits.concurrency["s"].scope == "global"


# ----------------------------------------------------------------- shipped configs


def _shipped_configs() -> list[Path]:
    return sorted([*REPO.glob("config/*.yaml"), *REPO.glob("config/examples/*.yaml")])


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_loads_cleanly(path):
    # Secrets have no default on purpose; give each such variable a stand-in value.
    env = {name: "test-value" for name in re.findall(r"\$\{(\w+)\}", path.read_text())}

    assert load_config(str(path), env=env).source == str(path)


@pytest.mark.parametrize(
    "pool, message",
    [
        (
            'command: ["w", "{port}"]\n    count: 1\n    restart: {backoff: 5s, max_backoff: 1s}',
            "cfg.yaml:6:41: upstreams.w.restart.max_backoff: must be at least restart.backoff",
        ),
        (
            'command: ["w", "{port}", "{gpu}"]\n    count: 1',
            "cfg.yaml:4:14: upstreams.w.command: uses {gpu}, which only 'gpus:' pools have",
        ),
    ],
    ids=["max-backoff-below-backoff", "gpu-placeholder-without-gpus"],
)
def test_worker_pool_semantic_errors(pool, message):
    text = (
        "upstreams:\n  w:\n    kind: worker_pool\n    " + pool + "\n"
        "routes:\n  - {name: r, upstream: w}\n"
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config_text(text, "cfg.yaml", env={})
    assert [str(e) for e in caught.value.errors] == [message]


def test_ws_endpoints_are_dialled_as_http_and_https():
    cfg = load_config_text(
        'upstreams: {a: {endpoints: [{url: "ws://h:1/p"}, {url: "WSS://h"}]}}\n'
        "routes: [{name: r, upstream: a, websocket_upstream: {answer_end: {match: {type: done}}}}]\n",
        "gw.yaml",
        env={},
    )
    assert [e.url for e in cfg.upstreams["a"].endpoints] == ["http://h:1/p", "https://h"]
    assert dict(cfg.routes[0].websocket_upstream.answer_end.match) == {"type": "done"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ('{"X-Key": "a\\r\\nInjected: 1"}', "upstreams.a.headers.X-Key: a header value may not hold a line break or NUL"),
        ('{"Bad Name": "v"}', "upstreams.a.headers.Bad Name: not a valid header name"),
    ],
    ids=["line-break-in-value", "space-in-name"],
)
def test_an_upstream_header_that_would_break_every_request_is_a_config_error(headers, message):
    errors = errors_of(
        f'upstreams: {{a: {{endpoints: [{{url: "http://h:1"}}], headers: {headers}}}}}\n'
        "routes: [{name: r, upstream: a}]\n"
    )
    assert len(errors) == 1 and errors[0].endswith(message), errors
    assert "Injected" not in errors[0]  # the value (often a secret) is never echoed
