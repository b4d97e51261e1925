"""Optional OpenTelemetry GenAI semantic-convention metrics (`telemetry.genai_metrics: true`).

For operators whose dashboards already speak the OTel GenAI conventions, the same requests the
streamgate_* metrics count are also observed as the convention's instruments, under the names
and label names Prometheus' OTel translation gives them (dots become underscores, a unit of
`s` becomes `_seconds`, `{token}` adds nothing), with the convention's bucket boundaries:

| instrument                          | exported as                                         |
|-------------------------------------|-----------------------------------------------------|
| gen_ai.server.request.duration      | gen_ai_server_request_duration_seconds              |
| gen_ai.server.time_to_first_token   | gen_ai_server_time_to_first_token_seconds           |
| gen_ai.server.time_per_output_token | gen_ai_server_time_per_output_token_seconds         |
| gen_ai.client.token.usage           | gen_ai_client_token_usage (+ gen_ai_token_type)     |

Labels stay bounded, as SPEC section 6 asks of every label: `gen_ai_operation_name` is one of
a fixed set read from the path; `gen_ai_request_model` is the matched route's configured
`match.model` (a name such as `gpt-4o-mini`, or a glob such as `llama-*`), or `_any` for a
route that matches any model; the model a client sends never becomes a label value by itself.
Requests that matched no route are not observed (they never reached a model).

Nothing is exported until the first observation, so with the option off /metrics is as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.metrics_core import Metric

from gateway.observe.request import ObservedRequest

# Bucket boundaries the GenAI semantic conventions advise for each instrument.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
TIME_TO_FIRST_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                               1.0, 2.5, 5.0, 7.5, 10.0)
TIME_PER_OUTPUT_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                                 1.0, 2.5)
TOKEN_USAGE_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                       16777216, 67108864)

ANY_MODEL = "_any"
OTHER_OPERATION = "_OTHER"  # the conventions' own value for "none of the known ones"
# Path endings → gen_ai.operation.name (well-known values of the conventions).
OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/embeddings", "embeddings"),
    ("/responses", "chat"),
)
LABELS = ("gen_ai_operation_name", "gen_ai_request_model")


def operation_name(path: str) -> str:
    path = path.split("?", 1)[0].rstrip("/")
    return next((name for suffix, name in OPERATIONS if path.endswith(suffix)), OTHER_OPERATION)


class GenAIMetrics:
    """The instruments, registered as one collector that stays silent until first used."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str, buckets: tuple, labels=LABELS) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=None)

        self.request_duration = histogram(
            "gen_ai_server_request_duration_seconds",
            "GenAI server request duration (OTel gen_ai.server.request.duration).",
            DURATION_BUCKETS,
        )
        self.time_to_first_token = histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to generate the first token (OTel gen_ai.server.time_to_first_token).",
            TIME_TO_FIRST_TOKEN_BUCKETS,
        )
        self.time_per_output_token = histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first (OTel gen_ai.server.time_per_output_token).",
            TIME_PER_OUTPUT_TOKEN_BUCKETS,
        )
        self.token_usage = histogram(
            "gen_ai_client_token_usage",
            "Tokens used per request, by type (OTel gen_ai.client.token.usage).",
            TOKEN_USAGE_BUCKETS,
            labels=(*LABELS, "gen_ai_token_type"),
        )
        self._used = False
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        if not self._used:
            return
        for histogram in (self.request_duration, self.time_to_first_token,
                          self.time_per_output_token, self.token_usage):
            yield from histogram.collect()

    def observe(self, ctx: ObservedRequest, now: float) -> None:
        """Once per request, from `Runtime.observe`, when `telemetry.genai_metrics` is on."""
        if ctx.route is None:
            return
        self._used = True
        labels = (operation_name(ctx.path), ctx.route.match.model or ANY_MODEL)
        self.request_duration.labels(*labels).observe(now - ctx.started)
        if ctx.first_chunk_at is not None and ctx.stream:
            self.time_to_first_token.labels(*labels).observe(ctx.first_chunk_at - ctx.started)
        if ctx.usage is None:
            return
        prompt, completion = ctx.usage
        self.token_usage.labels(*labels, "input").observe(prompt)
        self.token_usage.labels(*labels, "output").observe(completion)
        if ctx.stream and ctx.first_chunk_at is not None and completion > 1:
            per_token = (now - ctx.first_chunk_at) / (completion - 1)
            self.time_per_output_token.labels(*labels).observe(per_token)
