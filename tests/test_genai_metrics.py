"""OpenTelemetry GenAI semantic-convention metrics (`telemetry.genai_metrics`): off by default
(nothing new in /metrics), and when on, the convention's instruments under the names
Prometheus' OTel translation gives them, with the convention's buckets and bounded labels."""

from __future__ import annotations

import pytest

from gateway.observe.genai_metrics import TIME_TO_FIRST_TOKEN_BUCKETS, operation_name
from tests.conftest import config_yaml
from tests.support.scripted_upstream import Respond, Sleep, content, done, role_delta, usage_chunk
from tests.test_metrics import _chat, scrape, start

GENAI = (
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
    "gen_ai_client_token_usage",
)
STREAM_WITH_USAGE = Respond(
    sse=True,
    chunks=[role_delta(), content("a"), Sleep(0.05), content("b"), usage_chunk(7, 3), done()],
)


async def test_off_by_default_exports_nothing_new(start_gateway, upstream, client):
    upstream.script(STREAM_WITH_USAGE)
    gw, observed = await start(start_gateway, config_yaml(upstream.url))
    assert (await _chat(client, gw.url))[0] == 200
    await observed.wait(1)
    text = (await scrape(client, gw.admin_url)).text
    assert "gen_ai" not in text


@pytest.mark.parametrize(
    "model_match, label",
    [("", "_any"), (", model: 'm*'", "m*")],
    ids=["route-without-model-match", "model-glob-from-config"],
)
async def test_on_observes_the_convention_instruments(
    start_gateway, upstream, client, model_match, label
):
    upstream.script(STREAM_WITH_USAGE)
    top = "telemetry: {access_log: off, genai_metrics: true}\n"
    text = config_yaml(upstream.url).replace("telemetry: {access_log: off}\n", top)
    text = text.replace("match: {path_prefix: /}", "match: {path_prefix: /" + model_match + "}")
    gw, observed = await start(start_gateway, text)
    assert (await _chat(client, gw.url))[0] == 200
    await observed.wait(1)
    s = await scrape(client, gw.admin_url)

    labels = f"gen_ai_operation_name=chat,gen_ai_request_model={label}"
    for name in GENAI[:3]:
        assert s(name + "_count") == {labels: 1.0}, name
    assert s("gen_ai_client_token_usage_sum") == {
        labels + ",gen_ai_token_type=input": 7.0,
        labels + ",gen_ai_token_type=output": 3.0,
    }
    # two content tokens 50 ms apart: about 50 ms per output token after the first
    per_token = s.value("gen_ai_server_time_per_output_token_seconds_sum", labels) * 2
    assert 0.04 <= per_token < 2
    buckets = {float(k.split("le=")[1]) for k in s("gen_ai_server_time_to_first_token_seconds_bucket")}
    assert buckets == {*TIME_TO_FIRST_TOKEN_BUCKETS, float("inf")}
    assert "m" not in s.label_values - {"m*"}  # the client's model is never a label by itself


@pytest.mark.parametrize(
    "path, name",
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/completions?x=1", "text_completion"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/whatever/" + "x" * 50, "_OTHER"),
    ],
)
def test_operation_name_comes_from_a_fixed_set(path, name):
    assert operation_name(path) == name
