"""The request target: absolute-form is routed by its path, dot segments never let a path
escape its route's prefix, what was routed is what goes upstream, and a request the gateway
cannot handle still gets a JSON answer and a true access-log line (issue 12, findings 2 and 6)."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.protocols.http.target import BadTarget, parse_target, remove_dot_segments
from tests.support.raw_http import exchange, request
from tests.support.scripted_upstream import Respond, ScriptedUpstream


@pytest.mark.parametrize(
    "raw, path, forward",
    [
        pytest.param("/v1/chat/completions?a=1", "/v1/chat/completions", None, id="plain"),
        pytest.param("/v1/../admin/config", "/admin/config", "/admin/config", id="dotdot"),
        pytest.param(
            "/v1/models/../chat/completions?x=/../",
            "/v1/chat/completions",
            "/v1/chat/completions?x=/../",
            id="dotdot-query-untouched",
        ),
        pytest.param("/../../etc/passwd", "/etc/passwd", "/etc/passwd", id="never-above-root"),
        pytest.param("/a/./b/.", "/a/b/", "/a/b/", id="single-dots"),
        pytest.param("/v1/.well-known", "/v1/.well-known", "/v1/.well-known", id="dotfile-kept"),
        pytest.param("/v1/a%20b", "/v1/a b", "/v1/a%20b", id="escape-decoded-for-routing"),
        pytest.param("http://10.0.0.1:9/v1/x?q", "/v1/x", "/v1/x?q", id="absolute-form"),
        pytest.param("HTTPS://h", "/", "/", id="absolute-form-no-path"),
    ],
)
def test_targets_normalise_to_what_is_routed_and_forwarded(raw, path, forward):
    target = parse_target(raw)
    assert (target.path, target.forward) == (path, forward or raw)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("/v1/%2e%2e/admin", id="encoded-dotdot"),
        pytest.param("/v1/%2E/x", id="encoded-dot"),
        pytest.param("/v1/a%2Fb", id="encoded-slash"),
        pytest.param("/v1/a%5cb", id="encoded-backslash"),
        pytest.param("/v1/a%00", id="encoded-nul"),
        pytest.param("/v1/a%0d%0a", id="encoded-crlf"),
        pytest.param("/v1/a\\..\\b", id="backslash"),
        pytest.param("/v1/%zz", id="malformed-escape"),
        pytest.param("*", id="asterisk-form"),
        pytest.param("example.com:443", id="authority-form"),
        pytest.param("ftp://h/v1/x", id="other-scheme"),
    ],
)
def test_targets_that_cannot_be_normalised_safely_are_refused(raw):
    with pytest.raises(BadTarget):
        parse_target(raw)


def test_dot_segment_removal_follows_rfc_3986():
    # RFC 3986 5.4 examples, on absolute paths
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("/mid/content=5/../6") == "/mid/6"
    assert remove_dot_segments("/a/..") == "/"


def _two_routes(chat_url: str, v1_url: str) -> str:
    return (
        "server: {listen: 127.0.0.1:0}\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "upstreams:\n"
        f'  chat-up: {{kind: http, endpoints: [{{url: "{chat_url}"}}]}}\n'
        f'  v1-up: {{kind: http, endpoints: [{{url: "{v1_url}"}}]}}\n'
        "routes:\n"
        "  - {name: chat, upstream: chat-up, match: {path: /v1/chat/completions}}\n"
        "  - {name: v1, upstream: v1-up, match: {path_prefix: /v1/}}\n"
    )


@pytest.fixture
async def two_upstreams():
    async with ScriptedUpstream() as chat, ScriptedUpstream() as v1:
        chat.default = Respond(body=b'{"from": "chat"}')
        v1.default = Respond(body=b'{"from": "v1"}')
        yield chat, v1


def _access_lines(capsys) -> list[dict]:
    return [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]


async def test_absolute_form_is_routed_by_its_path_and_never_reaches_its_authority(
    start_gateway, two_upstreams, capsys
):
    chat, v1 = two_upstreams
    gw = await start_gateway(_two_routes(chat.url, v1.url))
    # The authority names v1's port: the upstream must still come from the config.
    target = f"{v1.url}/v1/chat/completions?stream=1"
    answer = await exchange(gw.url, request("POST", target, b"{}"))
    assert answer.status == 200 and answer.json() == {"from": "chat"}
    (sent,) = await chat.wait_for_requests(1)
    assert sent.path == "/v1/chat/completions?stream=1"  # origin-form upstream
    assert v1.requests == []
    (line,) = _access_lines(capsys)
    assert (line["status"], line["route"], line["outcome"]) == (200, "chat", "completed")


@pytest.mark.parametrize(
    "target, route, forwarded",
    [
        pytest.param(
            "/v1/models/../chat/completions",
            "chat",
            "/v1/chat/completions",
            id="dotdot-into-another-route",
        ),
        pytest.param("/v1/./models?q=/../x", "v1", "/v1/models?q=/../x", id="dot-query-kept"),
    ],
)
async def test_routing_uses_the_normalised_path_and_forwards_it(
    start_gateway, two_upstreams, target, route, forwarded
):
    chat, v1 = two_upstreams
    gw = await start_gateway(_two_routes(chat.url, v1.url))
    answer = await exchange(gw.url, request("POST", target, b"{}"))
    assert answer.status == 200
    assert answer.json() == {"from": route}
    (sent,) = await (chat if route == "chat" else v1).wait_for_requests(1)
    assert sent.path == forwarded


@pytest.mark.parametrize(
    "target, status",
    [
        pytest.param("/v1/../admin/config", 404, id="dotdot-out-of-the-prefix"),
        pytest.param("/v1/%2e%2e/admin/config", 400, id="encoded-dotdot"),
        pytest.param("/v1/models%2F..%2F..%2Fadmin", 400, id="encoded-slash"),
        pytest.param("/v1/x%00", 400, id="encoded-nul"),
    ],
)
async def test_a_path_never_escapes_its_routes_prefix(start_gateway, two_upstreams, target, status):
    chat, v1 = two_upstreams
    gw = await start_gateway(_two_routes(chat.url, v1.url))
    answer = await exchange(gw.url, request("GET", target))
    assert answer.status == status
    assert answer.json()["error"]["request_id"] == answer.headers["x-request-id"]
    assert chat.requests == [] and v1.requests == []
    # the connection and the gateway are fine: a normal request still works
    assert (await exchange(gw.url, request("POST", "/v1/chat/completions", b"{}"))).status == 200


async def test_an_exception_nobody_translated_is_a_json_500_with_a_true_log(
    start_gateway, two_upstreams, capsys, caplog, monkeypatch
):
    """The last line of defence, exercised with a failure injected below our code (the JSON
    decoder the gateway calls), not by patching the gateway itself."""
    chat, v1 = two_upstreams
    gw = await start_gateway(_two_routes(chat.url, v1.url))
    real_loads = json.loads

    def broken_loads(data, *args, **kwargs):
        if b"boom" in data:
            raise OSError("injected")
        return real_loads(data, *args, **kwargs)

    monkeypatch.setattr(json, "loads", broken_loads)
    caplog.set_level(logging.DEBUG, logger="streamgate")
    body = b'{"model": "boom"}'
    answer = await exchange(gw.url, request("POST", "/v1/chat/completions", body))
    monkeypatch.undo()
    assert answer.status == 500
    error = answer.json()["error"]
    assert error["type"] == "internal_error"
    assert error["request_id"] == answer.headers["x-request-id"]
    (line,) = _access_lines(capsys)
    assert line["status"] == 500 and line["outcome"] == "internal_error"
    assert line["request_id"] == error["request_id"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()
    assert error["request_id"] in errors[0].getMessage()
    assert not any(r.name.startswith("aiohttp") for r in caplog.records)
    assert (await exchange(gw.url, request("POST", "/v1/chat/completions", b"{}"))).status == 200


@pytest.mark.parametrize(
    "target, says",
    [
        pytest.param("/v1/models/../chat/completions", "route: chat", id="normalised"),
        pytest.param("/v1/%2e%2e/chat/completions", "the gateway answers 400", id="refused"),
    ],
)
def test_explain_routes_the_target_as_the_gateway_does(capsys, target, says):
    from pathlib import Path

    from gateway.explain import explain

    config = Path(__file__).resolve().parent.parent / "config/gateway.yaml"
    assert explain(str(config), "POST", target, [], None) == 0
    assert says in capsys.readouterr().out
