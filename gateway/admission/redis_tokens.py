"""Token budgets shared by every replica: GCRA in one Redis key per budget and key value.

The same bucket as `tokens.LocalTokenBudget`, decided by one atomic Lua script per reservation
and one per settlement, on Redis's own clock (replicas with skewed clocks still agree). Each
script touches one key, whose name carries a hash tag, so a Redis Cluster routes it whole.
Key values are digests (header values never reach Redis).

Reservations are taken with `call_or_undo`: a request cancelled while Redis works still gets
its reservation given back. Settlements run in the background and are best effort: one lost
while Redis is down leaves the estimate charged, which refills within `per`.
"""

from __future__ import annotations

from functools import partial

from gateway.admission.ratelimit import key_function
from gateway.admission.redis_ratelimit import digest
from gateway.admission.redis_state import RedisState
from gateway.admission.tokens import LocalTokenBudget, Reserved, refused
from gateway.config.model import TokenBudget
from gateway.errors import StateUnavailable

# Expiries are at least 1 ms: at µs times near 2^51 a double cannot hold a tiny reservation of
# a huge budget, so the TAT may not move at all, and PX 0 is an error.
# KEYS[1] bucket (TAT, µs of Redis's clock). ARGV[1] µs per token, ARGV[2] window µs,
# ARGV[3] tokens. Returns {allowed 0|1, remaining tokens, ms until full (or until it fits)}.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
local tat = stored and math.max(tonumber(stored), now) or now
local new_tat = tat + tonumber(ARGV[3]) * interval
local over = new_tat - now - window
if over > 0 then
  return {0, math.max(0, math.floor((window - (tat - now)) / interval)), math.ceil(over / 1000)}
end
local ttl = math.max(1, math.ceil((new_tat - now) / 1000))
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
return {1, math.floor((window - (new_tat - now)) / interval), math.ceil((new_tat - now) / 1000)}
"""

# KEYS[1] bucket. ARGV[1] µs per token, ARGV[2] tokens used minus tokens reserved (any sign).
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = redis.call('GET', KEYS[1])
local tat = stored and math.max(tonumber(stored), now) or now
tat = tat + tonumber(ARGV[2]) * tonumber(ARGV[1])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  local ttl = math.max(1, math.ceil((tat - now) / 1000))
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', ttl)
end
return 1
"""


class RedisTokenBudget:
    def __init__(self, name: str, config: TokenBudget, state: RedisState) -> None:
        self.name = name
        self.config = config
        self.backend = state
        self.key_of = key_function(config.key)
        window_us = config.per * 1_000_000
        self._interval_us = window_us / config.tokens
        self._window_us = round(window_us)
        self._state = state
        self._reserve = state.script(RESERVE)
        self._settle = state.script(SETTLE)
        self._prefix = state.key("tokens", "{" + name + ":")
        self._fallback = LocalTokenBudget(name, config)
        """Counts while Redis is unreachable under fail_open."""

    async def reserve(self, key: str, tokens: int) -> Reserved:
        bucket = self._prefix + digest(key) + "}"
        taken = min(tokens, self.config.tokens)
        args = (repr(self._interval_us), self._window_us, taken)
        try:
            allowed, remaining, wait_ms = await self._state.call_or_undo(
                self._reserve, (bucket,), args, undo=partial(self._undo, bucket, taken)
            )
        except StateUnavailable as exc:
            self._state.degrade(exc)
            return await self._fallback.reserve(key, tokens)
        if not allowed:
            raise refused(self.name, self.config, wait_ms / 1000)
        return Reserved(remaining, wait_ms / 1000, partial(self._settle_to, bucket, taken))

    def _settle_to(self, bucket: str, taken: int, used: int) -> None:
        if used != taken:
            args = (repr(self._interval_us), used - taken)
            self._state.spawn_quietly(self._state.call(self._settle, (bucket,), args))

    def _undo(self, bucket: str, taken: int, result: list[int]) -> None:
        if result[0]:
            self._settle_to(bucket, taken, 0)
