"""What a scenario hands back: table rows, notes, and the raw series behind the plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TARGETS = ("direct", "gateway", "nginx")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1), nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def ratio(a: float | None, b: float | None) -> float | None:
    """a ÷ b, or None when either is missing or b is not above zero (no meaningful ratio)."""
    return a / b if a is not None and b is not None and b > 0 and a >= 0 else None


@dataclass
class Row:
    """One line of the report: a metric for each target, and how it fares against its goal."""

    metric: str
    unit: str
    values: dict[str, float | None]
    """By target: `direct`, `gateway`, `nginx`, or a variant name."""
    ratio: float | None = None
    ratio_of: str = "nginx"
    """What `ratio` divides by, for the table: `gateway ÷ {ratio_of}`."""
    goal: str = ""
    ok: bool | None = None
    headline: bool = False


@dataclass
class ScenarioResult:
    key: str
    title: str
    measures: str
    """One paragraph: what is measured, and how."""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)
    """Raw data for plots, e.g. {"ttfc": {"c=64": {"gateway": [seconds...]}}}."""
    seconds: float = 0.0
    error: str | None = None

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


def check(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit
