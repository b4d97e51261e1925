"""Token budget series (documented additions, README "Metrics"), labelled by budget name."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class BudgetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reserved = Counter(
            "streamgate_token_budget_reserved_tokens_total",
            "Tokens reserved at admission (the estimate, capped at the budget's size).",
            ["limit"],
            registry=registry,
        )
        self.settled = Counter(
            "streamgate_token_budget_settled_tokens_total",
            "Tokens charged when requests ended (their usage, or the relayed-content count).",
            ["limit"],
            registry=registry,
        )
        self.refused = Counter(
            "streamgate_token_budget_refused_total",
            "Requests refused (429) because the budget could not cover their estimate.",
            ["limit"],
            registry=registry,
        )
