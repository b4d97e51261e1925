"""Rate limits shared by every replica: one atomic Lua script per check (GCRA).

GCRA (the generic cell rate algorithm) keeps one number per bucket, its "theoretical arrival
time" (TAT): when the bucket would be empty again if no one else came. A request advances it
by one emission interval (`per / rate`); it is allowed while the TAT stays within one whole
window (`rate` intervals) of now. That is exactly the local limiter's bucket (a burst of `rate`,
then one per interval), in one key with one expiry, decided atomically inside Redis on Redis's
own clock, so replicas with skewed clocks still agree.

Bucket keys are digests of the key value: header values (an Authorization header, say) never
reach Redis, and key length is bounded.
"""

from __future__ import annotations

import hashlib
import math
from functools import partial

from gateway.admission.ratelimit import (
    LocalRateLimiter,
    Taken,
    bucket_shape,
    key_function,
    rejection,
)
from gateway.admission.redis_state import RedisState
from gateway.config.model import RateLimit
from gateway.errors import StateUnavailable

# KEYS[1] bucket. ARGV[1] emission interval (µs), ARGV[2] bucket size (requests).
# Returns {allowed 0|1, remaining, retry_after_ms}. Times are µs of Redis's clock (below 2^53).
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = interval * tonumber(ARGV[2])
local stored = redis.call('GET', KEYS[1])
local tat = stored and math.max(tonumber(stored), now) or now
local new_tat = tat + interval
local over = new_tat - now - window
if over > 0 then
  return {0, 0, math.ceil(over / 1000)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((window - (new_tat - now)) / interval), 0}
"""

# KEYS[1] bucket. ARGV[1] emission interval (µs). Moves the TAT back by one request.
REFUND = """
local stored = redis.call('GET', KEYS[1])
if not stored then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(stored) - tonumber(ARGV[1])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
end
return 1
"""


class RedisRateLimiter:
    def __init__(self, name: str, config: RateLimit, state: RedisState) -> None:
        self.name = name
        self.config = config
        self.backend = state
        self.limit = max(1, math.floor(config.rate))
        self.key_of = key_function(config.key)
        size, period = bucket_shape(config)
        self._args = (max(1, round(period / size * 1_000_000)), size)
        self._state = state
        self._take = state.script(TAKE)
        self._refund = state.script(REFUND)
        self._prefix = state.key("rate", name) + ":"
        self._fallback = LocalRateLimiter(name, config)
        """Counts while Redis is unreachable under fail_open."""

    async def take(self, key: str) -> Taken:
        bucket = self._prefix + digest(key)
        try:
            allowed, remaining, retry_ms = await self._state.call_or_undo(
                self._take, (bucket,), self._args, undo=partial(self._undo, bucket)
            )
        except StateUnavailable as exc:
            self._state.degrade(exc)
            return await self._fallback.take(key)
        if not allowed:
            raise rejection(self.name, self.config, retry_ms / 1000)
        return Taken(remaining, partial(self._give_back, bucket))

    def _give_back(self, bucket: str) -> None:
        self._state.spawn_quietly(self._state.call(self._refund, (bucket,), self._args[:1]))

    def _undo(self, bucket: str, result: list[int]) -> None:
        if result[0]:
            self._give_back(bucket)


def digest(key: str) -> str:
    return hashlib.blake2b(key.encode(errors="surrogateescape"), digest_size=12).hexdigest()
