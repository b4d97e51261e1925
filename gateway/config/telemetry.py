"""The `telemetry` section: tracing, the access log and the optional GenAI metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class TracingConfig:
    exporter: Literal["none", "console", "otlp"] = "none"
    endpoint: str | None = None
    """OTLP/HTTP endpoint, e.g. http://127.0.0.1:4318/v1/traces (exporter: otlp)."""
    sample_ratio: float = 1.0
    """Fraction of new traces sampled, 0.0 to 1.0; a sampled parent is always followed."""


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    tracing: TracingConfig = TracingConfig()
    access_log: Literal["json", "off"] = "json"
    """One JSON line per request on stderr, or nothing."""
    genai_metrics: bool = False
    """Also export OpenTelemetry GenAI semantic-convention metrics
    (gen_ai_server_time_to_first_token_seconds, gen_ai_client_token_usage, ...) beside the
    streamgate_* ones; their model label is the route's configured `match.model` (bounded)."""
