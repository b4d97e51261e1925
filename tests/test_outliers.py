"""Outlier detection keeps faults local (issue 12, finding 1), Envoy's model: state per endpoint
and model sent, a cap on the share ejected, a panic threshold, a rule for what counts, and
ejection time that grows for an endpoint ejected again and again."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest

from gateway.config.model import EjectConfig
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.outliers import OutlierDetector
from tests.conftest import chat_body, config_yaml, http_upstream
from tests.support.scripted_upstream import (
    Close,
    NoResponse,
    ResetBeforeHeaders,
    Respond,
    ScriptedUpstream,
    Stall,
    content,
    error_body,
    role_delta,
    sse_tokens,
)

OK_STREAM = Respond(sse=True, chunks=sse_tokens(["ok "]))
FAILING = Respond(status=503, json={"error": {"message": "model crashed"}})
ONE_TRY = "retry: {attempts: 1}\n"


async def _chat(client, gw, model: str = "m", **extra) -> tuple[int, bytes]:
    async with client.post(
        gw.url + "/v1/chat/completions", json=chat_body(model=model, **extra)
    ) as resp:
        return resp.status, await resp.read()


def _sample(gw, name: str, **labels: str) -> float:
    return gw.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def _ejections(gw, upstream: str = "up") -> float:
    return _sample(gw, "streamgate_endpoint_ejections_total", upstream=upstream)


# ----------------------------------------------------------------- scope: endpoint and model


async def test_failing_models_do_not_eject_the_endpoint_for_the_others(start_gateway, client):
    """Issue 12: an endpoint serving every model; two models fail there. Requests for the
    other models still go to their healthy primary, and a 400 content-policy answer is
    passed through, not answered by the fallback."""
    policy = Respond(status=400, body=error_body("flagged", code="content_policy_violation"))

    def by_model(request):
        model = request.json()["model"]
        return {"broken-a": FAILING, "broken-b": FAILING, "flagged": policy}.get(model, OK_STREAM)

    async with ScriptedUpstream() as primary, ScriptedUpstream() as fallback:
        primary.default, fallback.default = by_model, OK_STREAM
        cfg = config_yaml(
            primary.url,
            upstream="eject: {consecutive_failures: 1, cooldown: 60s}\n",
            route=ONE_TRY + "fallbacks: [backup]\n",
            extra_upstreams=http_upstream("backup", fallback.url),
        )
        gw = await start_gateway(cfg)
        for model in ("broken-a", "broken-b"):
            assert (await _chat(client, gw, model))[0] == 200  # answered by the fallback
        assert _ejections(gw) == 2
        assert len(fallback.requests) == 2

        for i in range(10):
            model = ("llama", "qwen", "flagged")[i % 3]
            status, body = await _chat(client, gw, model)
            if model == "flagged":
                assert status == 400, body
                assert json.loads(body)["error"]["code"] == "content_policy_violation"
            else:
                assert status == 200 and b"ok " in body
        assert len(primary.requests) == 2 + 10  # every other model went to its primary
        assert len(fallback.requests) == 2
        # The broken models stay ejected: straight to the fallback, the primary left alone.
        assert (await _chat(client, gw, "broken-a"))[0] == 200
        assert (len(primary.requests), len(fallback.requests)) == (12, 3)


# ----------------------------------------------------------------- the cap and panic


async def test_ejection_is_capped_so_an_endpoint_stays_in_rotation(start_gateway, client):
    async with ScriptedUpstream() as a, ScriptedUpstream() as b:
        a.default = b.default = FAILING
        cfg = config_yaml(
            [a.url, b.url],
            upstream="balance: round_robin\neject: {consecutive_failures: 1, cooldown: 60s}\n",
            route=ONE_TRY,
        )
        gw = await start_gateway(cfg)
        assert (await _chat(client, gw))[0] == 503  # one endpoint fails: ejected
        assert (await _chat(client, gw))[0] == 503  # the other fails too: capped at 50%
        assert _ejections(gw) == 1
        a.default = b.default = OK_STREAM  # the outage ends
        for _ in range(3):
            assert (await _chat(client, gw))[0] == 200  # not 503 no_healthy_upstream
        assert len(a.requests) + len(b.requests) == 5
        assert _sample(gw, "streamgate_upstream_panic", upstream="up") == 0


async def test_in_panic_an_upstream_with_none_in_rotation_is_tried_not_refused(
    start_gateway, client, caplog
):
    caplog.set_level(logging.INFO, logger="streamgate.upstreams")
    async with ScriptedUpstream() as only:
        only.script(FAILING)
        only.default = OK_STREAM
        cfg = config_yaml(
            only.url,
            upstream="eject: {consecutive_failures: 1, cooldown: 300ms}\n",
            route=ONE_TRY,
        )
        gw = await start_gateway(cfg)
        assert (await _chat(client, gw))[0] == 503  # the upstream's own 503, relayed
        assert _ejections(gw) == 1
        for _ in range(3):  # ejected, alone, no fallback: tried anyway, and it has recovered
            status, body = await _chat(client, gw)
            assert status == 200, body
        assert len(only.requests) == 4
        assert _sample(gw, "streamgate_upstream_panic", upstream="up") == 1
        async with client.get(gw.admin_url + "/readyz") as resp:
            readyz = await resp.json()
        assert resp.status == 200 and any("panic" in r for r in readyz["reasons"]), readyz
        entered = [r for r in caplog.records if "panic" in r.getMessage()]
        assert len(entered) == 1, [r.getMessage() for r in entered]  # logged once, not per request

        await asyncio.sleep(0.35)  # the cooldown is a span of time: let it pass
        assert _sample(gw, "streamgate_upstream_panic", upstream="up") == 0
        assert any("out of panic" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------- what counts toward ejection


@pytest.mark.parametrize(
    "fault, route, counts",
    [
        pytest.param(FAILING, "", True, id="503"),
        pytest.param(ResetBeforeHeaders(), "", True, id="reset-before-headers"),
        pytest.param(NoResponse(), "timeouts: {first_chunk: 100ms}\n", True, id="first-chunk"),
        pytest.param(Respond(status=400, body=error_body("bad")), "", False, id="400"),
        pytest.param(Respond(status=429, body=error_body("slow")), "", False, id="429"),
        pytest.param(
            NoResponse(), "timeouts: {total: 100ms}\n", False, id="the-requests-own-total"
        ),
        pytest.param(
            Respond(sse=True, chunks=[role_delta(), content("a "), Stall()]),
            "timeouts: {chunk_gap: 100ms}\n",
            False,
            id="stall-after-commit",
        ),
        pytest.param(
            Respond(sse=True, chunks=[role_delta(), content("a "), Close()]),
            "",
            False,
            id="cut-after-commit",
        ),
    ],
)
async def test_what_counts_toward_ejection(start_gateway, upstream, client, fault, route, counts):
    """Failures of the endpoint before the commit point count; 4xx, the request's own budget,
    and faults after the commit point (that stream's, already counted in stream errors) never."""
    upstream.script(fault)
    upstream.default = OK_STREAM
    cfg = config_yaml(
        upstream.url,
        upstream="eject: {consecutive_failures: 1, cooldown: 60s, panic_threshold: 0}\n",
        route=ONE_TRY + route,
    )
    gw = await start_gateway(cfg)
    async with aiohttp.ClientSession() as once:  # a stream ended by an error event closes
        await _chat(once, gw)  # its connection: the next request must not race that close
    assert _ejections(gw) == (1 if counts else 0)
    status, body = await _chat(client, gw)  # panic off: an ejected lone endpoint refuses
    if counts:
        assert status == 503 and json.loads(body)["error"]["type"] == "no_healthy_upstream"
    else:
        assert status == 200 and b"ok " in body


async def test_a_client_that_goes_away_never_counts(start_gateway, upstream, client):
    upstream.script(NoResponse())
    upstream.default = OK_STREAM
    cfg = config_yaml(
        upstream.url, upstream="eject: {consecutive_failures: 1, cooldown: 60s}\n", route=ONE_TRY
    )
    gw = await start_gateway(cfg)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await _chat(client, gw)
    await upstream.wait_for_closed_events(1)  # the gateway saw it go and closed upstream
    assert _ejections(gw) == 0
    assert (await _chat(client, gw))[0] == 200


# ----------------------------------------------------------------- ejection time


def test_ejection_time_grows_with_each_ejection_up_to_max_cooldown_then_starts_over():
    config = EjectConfig(consecutive_failures=2, cooldown=1.0, max_cooldown=2.5)
    detector = OutlierDetector("up", config)
    ep = Endpoint("http://127.0.0.1:1")
    peers = [ep]

    def eject_at(now: float) -> float:
        """Fail until ejected at `now`; the ejection time it got."""
        while not detector.failure(ep, "m", now, peers):
            pass
        until = now
        while detector.ejected(ep, "m", until):
            until += 0.25
        return until - now

    assert eject_at(0.0) == 1.0
    assert detector.ejected(ep, "m", 0.5) and not detector.ejected(ep, "other-model", 0.5)
    # Half-open after the cooldown: one more failure ejects again, for longer each time.
    assert detector.failure(ep, "m", 1.0, peers)
    assert detector.ejected(ep, "m", 2.9) and not detector.ejected(ep, "m", 3.0)  # 2 x 1s
    assert eject_at(3.0) == 2.5  # 3 x 1s, capped at max_cooldown
    # A success closes the half-open state: one failure alone no longer ejects.
    detector.success(ep, "m", 6.0)
    assert not detector.failure(ep, "m", 6.0, peers)
    # Not ejected for longer than max_cooldown: the growth starts over.
    assert eject_at(20.0) == 1.0
