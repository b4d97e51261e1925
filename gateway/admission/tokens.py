"""Token budgets: reserve an estimate at admission, settle to real usage at the end.

A budget of `tokens` per `per` is a bucket that refills continuously, kept as GCRA (as the
Redis rate limits are): one "theoretical arrival time" (TAT) per key, the moment the bucket
would be full again. Reserving n tokens moves it n intervals (`per / tokens`) on and is allowed
while it stays within one window of now; settling moves it by (used - reserved) intervals,
back for tokens not used and on for tokens used beyond the estimate. Debt is allowed (a stream
may use more than it reserved), and is what makes the next refusal's Retry-After truthful: the
wait is exactly until the bucket covers that request's estimate.

A reservation is capped at the bucket size, so a request larger than the whole budget waits
for a full bucket rather than never fitting. A reservation never settled (a replica died) stays
charged, and refills within `per` like any use: nothing leaks for longer than one window.

The estimate: `max_completion_tokens`, else `max_tokens`, else the budget's
`default_max_tokens`; plus the request body's bytes / `bytes_per_token` for the prompt. What is
settled (`tokens_used`): the upstream's `usage` (prompt + completion) when it reported one;
else, for a successful answer that reached the client, the prompt estimate plus one token per
relayed stream event (an SSE event or NDJSON line carries about one token), or body bytes /
`bytes_per_token` for a whole answer; for a request no upstream answered (or answered with an
error status), nothing.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple, Protocol

from gateway.admission.ratelimit import KeyFunction, key_function
from gateway.config.model import TokenBudget
from gateway.errors import RateLimited


class Usage(Protocol):
    """What settlement reads of a finished request (the engine's RequestContext)."""

    json: dict | None
    body: bytes
    stream: bool
    status: int
    usage: tuple[int, int] | None
    first_chunk_at: float | None
    chunks: int
    bytes: int


class Reserved(NamedTuple):
    """What a successful `reserve` hands back."""

    remaining: int
    """Tokens the key may still reserve now (x-ratelimit-remaining-tokens)."""
    reset_s: float
    """Seconds until the bucket is full again (x-ratelimit-reset-tokens)."""
    settle: Callable[[int], None]
    """Settle the reservation to this many tokens used; call exactly once."""


class TokenLimiter(Protocol):
    name: str
    config: TokenBudget
    backend: object | None
    key_of: KeyFunction

    async def reserve(self, key: str, tokens: int) -> Reserved:
        """Reserve `tokens` (at most the bucket size) for `key`, or raise RateLimited."""
        ...


def estimate(request: Usage, config: TokenBudget) -> tuple[int, int]:
    """(prompt, completion) tokens to reserve for `request`."""
    body = request.json or {}
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    valid = isinstance(asked, int) and not isinstance(asked, bool) and asked >= 0
    completion = asked if valid else config.default_max_tokens
    return len(request.body) // config.bytes_per_token, completion


def tokens_used(request: Usage, prompt_estimate: int, bytes_per_token: int) -> int:
    if request.usage is not None:
        return sum(request.usage)
    if request.first_chunk_at is None or request.status >= 400:
        return 0  # no upstream answered, or it answered with an error: nothing was generated
    if request.stream:
        return prompt_estimate + request.chunks
    return prompt_estimate + request.bytes // bytes_per_token


def refused(name: str, config: TokenBudget, retry_after_s: float) -> RateLimited:
    return RateLimited(
        f"token budget {name!r} allows {config.tokens} tokens per {config.per:g}s",
        retry_after=max(1.0, retry_after_s),
        limit=name,
        rate=config.tokens,
    )


class LocalTokenBudget:
    """In this process only: each replica counts on its own."""

    backend = None

    def __init__(self, name: str, config: TokenBudget) -> None:
        self.name = name
        self.config = config
        self.key_of = key_function(config.key)
        self._interval = config.per / config.tokens
        self._tats: OrderedDict[str, float] = OrderedDict()

    async def reserve(self, key: str, tokens: int) -> Reserved:
        now = asyncio.get_running_loop().time()
        tats = self._tats
        tat = max(tats.get(key, now), now) + min(tokens, self.config.tokens) * self._interval
        over = tat - now - self.config.per
        if over > 1e-9:
            raise refused(self.name, self.config, over)
        tats[key] = tat
        tats.move_to_end(key)
        if len(tats) > self.config.max_keys:
            tats.popitem(last=False)
        taken = min(tokens, self.config.tokens)
        remaining = math.floor((self.config.per - (tat - now)) / self._interval + 1e-9)
        return Reserved(max(0, remaining), tat - now, lambda used: self._settle(key, used - taken))

    def _settle(self, key: str, delta: int) -> None:
        if not delta:
            return
        now = asyncio.get_running_loop().time()
        tat = max(self._tats.get(key, now), now) + delta * self._interval
        if tat > now:
            self._tats[key] = tat
        else:
            self._tats.pop(key, None)  # a full bucket is the same as no entry
