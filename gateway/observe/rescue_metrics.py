"""Hedge and resume series (documented additions, README "Metrics"), labelled by route."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

RESUME_RESULTS = ("continued", "spliced", "failed")
"""`continued`: a backend continued the prefill; `spliced`: a backend that refused it answered
again and its answer was relayed past the text already sent; `failed`: no try could continue
(the stream ended as it would have without `resume`)."""


class RescueMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hedges_started = Counter(
            "streamgate_hedges_started_total",
            "Tries started beside a try that had sent no content yet (route hedge).",
            ["route"],
            registry=registry,
        )
        self.hedges_won = Counter(
            "streamgate_hedges_won_total",
            "Requests whose answer came from a hedge.",
            ["route"],
            registry=registry,
        )
        self.hedges_over_budget = Counter(
            "streamgate_hedges_over_budget_total",
            "Hedges not started because the route's hedge budget was spent.",
            ["route"],
            registry=registry,
        )
        self.resumes = Counter(
            "streamgate_resumes_total",
            "Committed streams that broke and were asked to continue, by what broke them"
            " (reset, cut, chunk_gap_timeout) and how it went.",
            ["route", "reason", "result"],
            registry=registry,
        )
