"""Requests refused before a route or upstream was chosen are counted with the label value
`none`, never an empty string (issue 12, finding 5; SPEC section 6)."""

from __future__ import annotations

import pytest

from gateway.observe.metrics import NO_NAME
from tests.conftest import config_yaml
from tests.support.raw_http import exchange, request
from tests.support.scripted_upstream import Respond

ROUTED_UNDER_V1 = "match: {path_prefix: /v1/}\n"


@pytest.mark.parametrize(
    "probe, status, route",
    [
        pytest.param(request("POST", "/elsewhere", b"{}"), 404, NO_NAME, id="no-route"),
        pytest.param(request("POST", "/v1/x", b"x" * 2048), 413, NO_NAME, id="too-large"),
        pytest.param(request("POST", "/v1/%2e%2e/x", b"{}"), 400, NO_NAME, id="bad-target"),
        pytest.param(request("POST", "/v1/x", b"{}"), 429, "v1", id="rate-limited"),
    ],
)
async def test_refused_requests_are_labelled_none_where_no_config_name_applies(
    start_gateway, upstream, probe, status, route
):
    yaml_text = config_yaml(
        upstream.url,
        top="limits: {rate: {one-a-minute: {rate: 1, per: 60s}}}\n",
        server="max_request_body: 1KiB",
    ).replace(
        "routes:\n  - name: r\n    upstream: up\n    match: {path_prefix: /}\n",
        "routes:\n  - name: v1\n    upstream: up\n    limits: [one-a-minute]\n    "
        + ROUTED_UNDER_V1,
    )
    upstream.default = Respond(body=b"{}")
    gw = await start_gateway(yaml_text)
    if status == 429:  # the first request spends the route's one token
        assert (await exchange(gw.url, request("POST", "/v1/x", b"{}"))).status == 200
    answer = await exchange(gw.url, probe)
    assert answer.status == status
    registry = gw.gateway.metrics.registry
    labels = {"route": route, "upstream": NO_NAME, "status": str(status), "stream": "false"}
    assert registry.get_sample_value("streamgate_requests_total", labels) == 1.0
    for metric in registry.collect():
        for sample in metric.samples:
            assert "" not in sample.labels.values(), (sample.name, sample.labels)
