"""Retry conditions: what `retry.on` and `retry.fallback_on` mean together (issue 12, finding 3).

A condition the operator lists in `retry.on` is retried on the same upstream, even one the
*default* `fallback_on` names (first_chunk_timeout): written `on` is taken out of the default.
Written in both lists, a condition is a config error, since fallback_on would always win.
"""

from __future__ import annotations

import textwrap

import pytest

from gateway.config.loader import load_config_text
from gateway.errors import ConfigErrors
from tests.conftest import chat_body, config_yaml, http_upstream
from tests.support.scripted_upstream import NoResponse, Respond, ScriptedUpstream, sse_tokens

OK_STREAM = Respond(sse=True, chunks=sse_tokens(["ok "]))


async def test_first_chunk_timeout_in_retry_on_retries_the_same_upstream_first(
    start_gateway, client
):
    async with ScriptedUpstream() as slow, ScriptedUpstream() as fallback:
        slow.default, fallback.default = NoResponse(), OK_STREAM
        cfg = config_yaml(
            slow.url,
            route=(
                "timeouts: {first_chunk: 200ms}\n"
                "retry: {attempts: 2, on: [first_chunk_timeout], backoff: {base: 1ms, max: 1ms}}\n"
                "fallbacks: [backup]\n"
            ),
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as resp:
            assert resp.status == 200 and b"ok " in await resp.read()
        assert (len(slow.requests), len(fallback.requests)) == (2, 1)


def _route_retry(retry: str) -> str:
    return config_yaml("http://127.0.0.1:1", route=f"retry: {retry}\n")


@pytest.mark.parametrize(
    "retry, on, fallback_on",
    [
        pytest.param(
            "{}",
            ("connect_error", "reset", "empty_body", "429", "500", "502", "503", "504"),
            ("first_chunk_timeout", "context_length_exceeded"),
            id="defaults",
        ),
        pytest.param(
            "{on: [first_chunk_timeout, 503]}",
            ("first_chunk_timeout", "503"),
            ("context_length_exceeded",),
            id="written-on-leaves-the-default-fallback-on",
        ),
        pytest.param(
            "{on: [503], fallback_on: [first_chunk_timeout]}",
            ("503",),
            ("first_chunk_timeout",),
            id="both-written-as-is",
        ),
    ],
)
def test_the_default_fallback_on_never_overrides_a_written_retry_on(retry, on, fallback_on):
    policy = load_config_text(_route_retry(retry), "t.yaml", env={}).routes[0].retry
    assert (policy.on, policy.fallback_on) == (on, fallback_on)


def test_a_condition_written_in_both_lists_is_an_error():
    text = _route_retry("{on: [reset, first_chunk_timeout], fallback_on: [first_chunk_timeout]}")
    with pytest.raises(ConfigErrors) as errors:
        load_config_text(text, "t.yaml", env={})
    [error] = [str(e) for e in errors.value.errors]
    assert error.startswith("t.yaml:")
    assert "routes[0].retry.fallback_on[0]: 'first_chunk_timeout' is also in retry.on" in error


@pytest.mark.parametrize(
    "eject, message",
    [
        ("{max_ejected_percent: 101}", "eject.max_ejected_percent: must be a percentage 0-100"),
        ("{panic_threshold: -1}", "eject.panic_threshold: must be a percentage 0-100"),
        ("{cooldown: 30s, max_cooldown: 10s}", "eject.max_cooldown: must be at least cooldown"),
        (
            "{max_ejection_percent: 10}",
            "eject.max_ejection_percent: unknown key 'max_ejection_percent'"
            " (did you mean 'max_ejected_percent'?)",
        ),
    ],
)
def test_eject_keys_are_validated_at_load_time(eject, message):
    text = config_yaml("http://127.0.0.1:1", upstream=f"eject: {eject}\n")
    with pytest.raises(ConfigErrors) as errors:
        load_config_text(textwrap.dedent(text), "t.yaml", env={})
    [error] = [str(e) for e in errors.value.errors]
    assert error.startswith("t.yaml:") and f"upstreams.up.{message}" in error, error


def test_pool_exhausted_is_a_known_retry_condition():
    text = _route_retry("{on: [pool_exhausted], fallback_on: [pool_exhaustd]}")
    with pytest.raises(ConfigErrors) as errors:
        load_config_text(text, "t.yaml", env={})
    [error] = [str(e) for e in errors.value.errors]
    assert "unknown condition 'pool_exhaustd' (did you mean 'pool_exhausted'?)" in error
