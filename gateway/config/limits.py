"""The `limits` section: concurrency, rate limits and token budgets (part of model.py's schema).

Every field carries its unit, default and meaning beside it, as in `model.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.config.units import Seconds, frozen_map


@dataclass(frozen=True, slots=True)
class Weights:
    stream: int = 1
    unary: int = 1


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    capacity: int
    """Units available; a request holds its weight in units for the life of its response."""
    weights: Weights = Weights()
    max_queue: int = 1000
    """Requests (not units) allowed to wait; beyond this, 503 at once."""
    scope: Literal["local", "global"] = "local"
    """`global` shares the capacity across replicas through Redis leases."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float
    """Requests admitted per `per` window, per key."""
    per: Seconds = 1.0
    key: str = "route"
    """`route`, `client_ip` or `header:NAME`."""
    scope: Literal["local", "global"] = "local"
    max_keys: int = 10000
    """Bound on distinct keys kept in memory (least recently used are forgotten)."""


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """Tokens (prompt + completion) per `per` window, per key: a bucket of `tokens` that
    refills continuously. Admission reserves an estimate and refuses (429) when the bucket
    cannot cover it; the request's end settles the reservation to what it really used."""

    tokens: int
    """Bucket size: tokens a key may use per `per` (and at once, in a burst)."""
    per: Seconds = 60.0
    key: str = "route"
    """`route`, `client_ip` or `header:NAME`, as for rate limits."""
    scope: Literal["local", "global"] = "local"
    """`global` counts in Redis, atomically across replicas; a replica that dies before
    settling leaves its reservation charged, which refills within `per` like any use."""
    default_max_tokens: int = 1024
    """Completion tokens reserved for a request that names neither `max_tokens` nor
    `max_completion_tokens`."""
    bytes_per_token: int = 4
    """The prompt estimate: request body bytes divided by this (settled to the upstream's
    `usage.prompt_tokens` where it reports one)."""
    max_keys: int = 10000
    """`scope: local`: bound on distinct keys kept in memory (least recently used go first)."""
    max_tokens_per_stream: int | None = None
    """Completion tokens one stream may produce (default: no cap). Counted as settlement
    counts them, one per relayed event, or the upstream's `usage.completion_tokens` when it
    arrives; past the cap the gateway ends the stream visibly (SSE `event: error`, condition
    `token_cap_exceeded`) and closes the upstream. With several budgets, the smallest wins."""


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    concurrency: Mapping[str, ConcurrencyLimit] = field(default_factory=frozen_map)
    rate: Mapping[str, RateLimit] = field(default_factory=frozen_map)
    tokens: Mapping[str, TokenBudget] = field(default_factory=frozen_map)
    """Token budgets, charged after rate limits and before concurrency (see TokenBudget)."""
