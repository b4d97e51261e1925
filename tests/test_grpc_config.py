"""gRPC in the config file: what loads, what is refused (with file:line:col and the path), and
what `streamgate explain` says of a gRPC call and of a bridge route."""

from __future__ import annotations

import textwrap

import pytest

from gateway.config.loader import load_config_text
from gateway.errors import ConfigErrors
from tests.test_cli import streamgate

UPSTREAMS = """\
upstreams:
  g: {kind: grpc, endpoints: [{url: "grpc://127.0.0.1:50051"}, {url: "grpcs://models.example:443"}]}
  h: {kind: http, endpoints: [{url: "http://127.0.0.1:9000"}]}
"""


def errors_of(routes: str, upstreams: str = UPSTREAMS, server: str = "") -> list[str]:
    text = server + upstreams + "routes:\n" + textwrap.indent(textwrap.dedent(routes), "  ")
    with pytest.raises(ConfigErrors) as caught:
        load_config_text(text, "gw.yaml", {})
    return [str(e) for e in caught.value.errors]


def test_a_grpc_config_loads():
    text = (
        "server: {grpc_listen: 127.0.0.1:50051}\n"
        + UPSTREAMS
        + "routes:\n"
        + "  - {name: calls, upstream: g, grpc: {method: '/blazerpc.*', stream: false},"
        + " retry: {on: [UNAVAILABLE, RESOURCE_EXHAUSTED]}}\n"
        + "  - {name: sse, upstream: g, match: {path: /v1/generate},"
        + " grpc_bridge: {method: /blazerpc.InferenceService/PredictGenerate}}\n"
    )
    config = load_config_text(text, "gw.yaml", {})
    assert config.server.grpc_listen == ("127.0.0.1", 50051)
    calls, sse = config.routes
    assert (calls.grpc.method, calls.grpc.stream) == ("/blazerpc.*", False)
    assert calls.retry.on == ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
    assert (sse.grpc_bridge.output, sse.grpc_bridge.descriptor_set) == ("sse", None)


@pytest.mark.parametrize(
    "routes, upstreams, expected",
    [
        pytest.param(
            "- {name: r, upstream: g}\n",
            UPSTREAMS,
            "gw.yaml:5:25: routes[0].upstream: upstream 'g' speaks gRPC: the route needs a grpc"
            " block (gRPC calls) or grpc_bridge (HTTP requests served by a gRPC method)",
            id="grpc-upstream-on-a-plain-route",
        ),
        pytest.param(
            "- {name: r, upstream: h, grpc: {}}\n",
            UPSTREAMS,
            "gw.yaml:5:25: routes[0].upstream: upstream 'h' does not speak gRPC (kind http)",
            id="http-upstream-on-a-grpc-route",
        ),
        pytest.param(
            "- {name: r, upstream: g, grpc: {}, websocket: {}}\n",
            UPSTREAMS,
            "gw.yaml:5:34: routes[0].grpc: a route takes one of websocket or grpc",
            id="two-protocol-blocks",
        ),
        pytest.param(
            "- {name: r, upstream: g, grpc: {}, match: {model: 'llama-*'}}\n",
            UPSTREAMS,
            "gw.yaml:5:53: routes[0].match.model: a gRPC call has no JSON body: no model to match",
            id="model-on-a-grpc-route",
        ),
        pytest.param(
            "- {name: r, upstream: g, grpc: {}, retry: {on: [UNAVAILBLE]}}\n",
            UPSTREAMS,
            "gw.yaml:5:51: routes[0].retry.on[0]: unknown condition 'UNAVAILBLE'"
            " (did you mean 'UNAVAILABLE'?)",
            id="misspelt-status-name",
        ),
        pytest.param(
            "- {name: r, upstream: g, grpc_bridge: {method: PredictGenerate}}\n",
            UPSTREAMS,
            "gw.yaml:5:50: routes[0].grpc_bridge.method: 'PredictGenerate' is not a method"
            " name (/package.Service/Method)",
            id="bridge-method-not-a-path",
        ),
        pytest.param(
            "- {name: r, upstream: g, grpc_bridge: {method: /a.B/C, descriptor_set: /no/such.pb}}\n",
            UPSTREAMS,
            "gw.yaml:5:74: routes[0].grpc_bridge.descriptor_set: cannot read '/no/such.pb':"
            " No such file or directory",
            id="descriptor-set-missing",
        ),
        pytest.param(
            "- {name: r, upstream: g, grpc: {}}\n",
            'upstreams:\n  g: {kind: grpc, endpoints: [{url: "http://127.0.0.1:1"}]}\n',
            "gw.yaml:2:37: upstreams.g.endpoints[0].url: invalid url 'http://127.0.0.1:1'"
            " (use grpc://host:port or grpcs://host:port)",
            id="http-url-on-a-grpc-upstream",
        ),
    ],
)
def test_refused_grpc_configs_say_where_and_why(routes, upstreams, expected):
    assert errors_of(routes, upstreams) == [expected]


def test_a_descriptor_set_without_the_method_is_refused(tmp_path):
    from google.protobuf import descriptor_pb2

    from tests.support.grpc_upstream import file_descriptor

    path = tmp_path / "tokens.pb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet(file=[file_descriptor()]).SerializeToString())
    route = f"- {{name: r, upstream: g, grpc_bridge: {{method: /streamtest.Tokens/Nope, descriptor_set: {path}}}}}\n"
    (error,) = errors_of(route)
    assert error.endswith("service 'streamtest.Tokens' has no method 'Nope' (it has: Join, One, Stream)")


def test_explain_shows_a_grpc_call_and_its_route(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(
        "server: {grpc_listen: 127.0.0.1:50051}\n" + UPSTREAMS + "routes:\n"
        "  - {name: acme, upstream: g, grpc: {method: '/blazerpc.*'}, match: {headers: {x-tenant: acme}}}\n"
        "  - {name: unary, upstream: g, grpc: {method: '*/PredictEcho', stream: false}}\n"
        "  - {name: bridge, upstream: g, match: {path: /v1/generate}, grpc_bridge: {method: /a.B/C}}\n"
    )
    result = streamgate(
        "explain",
        str(path),
        "--grpc",
        "--path",
        "/blazerpc.InferenceService/PredictEcho",
        "--header",
        "x-tenant: zed",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "request: gRPC call /blazerpc.InferenceService/PredictEcho" in out
    assert "routes[0] 'acme': no, header x-tenant is 'zed', not 'acme'" in out
    assert "routes[1] 'unary': matches" in out
    assert "kind: gRPC call (charged as unary, per grpc.stream)" in out
    assert "1. g: grpc, least_outstanding over grpc://127.0.0.1:50051 (weight 1)" in out
    assert "grpc: method glob '*/PredictEcho'; messages relayed as opaque bytes" in out
    http = streamgate("explain", str(path), "--method", "POST", "--path", "/v1/generate")
    assert "routes[0] 'acme': no, a gRPC route, and this is no gRPC call" in http.stdout
    assert "grpc bridge: the JSON body becomes /a.B/C's request" in http.stdout
    assert "server reflection" in http.stdout
