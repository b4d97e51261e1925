"""Charging a route's token budgets: reserve at admission, settle once when the request ends.

Budgets are charged after rate limits (a request a rate limit refuses reserves nothing) and
before concurrency (a request refused for tokens never queues). Every budget of the route
reserves the same estimate; settlement charges each the same tokens used. Whatever was reserved
is settled exactly once, by `Admission.admit`'s exit, on every path: to zero when a later limit
refuses, to the request's usage otherwise (see `tokens.tokens_used`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

from gateway.admission.ratelimit import carried_over
from gateway.admission.redis_state import RedisState
from gateway.admission.redis_tokens import RedisTokenBudget
from gateway.admission.tokens import (
    LocalTokenBudget,
    TokenLimiter,
    Usage,
    estimate,
    tokens_used,
)
from gateway.config.model import LimitsConfig
from gateway.errors import RateLimited
from gateway.observe.budget_metrics import BudgetMetrics


class Budgeted(Usage, Protocol):
    client_ip: str
    token_budget: tuple[int, int, float] | None
    """(budget size, tokens remaining, seconds until full) of the tightest budget charged."""


class Charge(NamedTuple):
    name: str
    prompt: int
    """The prompt estimate, settled when the upstream reports no usage."""
    bytes_per_token: int
    settle: Callable[[int], None]


def token_limiters(
    limits: LimitsConfig, state: RedisState | None, previous: Mapping[str, TokenLimiter]
) -> dict[str, TokenLimiter]:
    """The budgets of `limits`; one whose config and backend are unchanged keeps its buckets."""
    return carried_over(limits.tokens, state, previous, LocalTokenBudget, RedisTokenBudget)


async def reserve(
    ctx: Budgeted,
    route: str,
    headers: Mapping[str, str],
    limiters: tuple[TokenLimiter, ...],
    metrics: BudgetMetrics,
) -> list[Charge]:
    """Reserve the request's estimate from every budget, or none (RateLimited)."""
    charges: list[Charge] = []
    try:
        for limiter in limiters:
            config = limiter.config
            prompt, completion = estimate(ctx, config)
            wanted = min(prompt + completion, config.tokens)
            try:
                got = await limiter.reserve(limiter.key_of(route, ctx.client_ip, headers), wanted)
            except RateLimited as err:
                ctx.token_budget = (config.tokens, 0, err.retry_after)
                metrics.refused.labels(limiter.name).inc()
                raise
            metrics.reserved.labels(limiter.name).inc(wanted)
            charges.append(Charge(limiter.name, prompt, config.bytes_per_token, got.settle))
            if ctx.token_budget is None or got.remaining < ctx.token_budget[1]:
                ctx.token_budget = (config.tokens, got.remaining, got.reset_s)
    except BaseException:
        settle(ctx, charges, metrics, refund=True)
        raise
    return charges


def settle(ctx: Usage, charges: list[Charge], metrics: BudgetMetrics, refund: bool = False) -> None:
    """Settle each reservation to the tokens the request used (none, on `refund`)."""
    for charge in charges:
        used = 0 if refund else tokens_used(ctx, charge.prompt, charge.bytes_per_token)
        charge.settle(used)
        metrics.settled.labels(charge.name).inc(used)
