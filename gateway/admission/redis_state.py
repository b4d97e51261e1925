"""Shared state in Redis for `scope: global` limits: the client, and the one boundary where
Redis errors become `StateUnavailable`.

- Every call is bounded by CALL_TIMEOUT_S, connecting included, and is never retried by the
  client library: a request must not wait on Redis longer than that.
- After a failure Redis counts as down for DOWN_FOR_S: calls fail at once instead of every
  request paying the timeout. The first call after that tries again, so when Redis comes back
  the limits use it again without a restart.
- `state.on_error` is applied through `degrade()`: `fail_closed` re-raises (503); `fail_open`
  lets the limit carry on with its per-replica copy (each replica enforces the whole limit on
  its own, so an outage loosens a global limit by at most the replica count instead of lifting
  it) and counts those requests in a warning logged at most once per FAIL_OPEN_LOG_EVERY_S.
- Global concurrency units are leases that expire unless renewed: one task per state renews
  every lease of this replica each `lease_ttl / 3`, so the units of a replica that dies come
  back within `lease_ttl`. Another listens to release announcements (pub/sub) to wake queues.

One `RedisState` serves every limit of one `state` config; a reload with the same `state`
section keeps it (and its connections and leases), see `retain()` / `close()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from gateway.admission.redis_client import connect
from gateway.config.model import StateConfig
from gateway.errors import StateUnavailable

log = logging.getLogger("streamgate.state")

KEY_PREFIX = "streamgate"
CALL_TIMEOUT_S = 0.5
"""Longest wait for one Redis call, connecting included."""
DOWN_FOR_S = 1.0
"""After a failed call, how long calls fail at once before Redis is tried again."""
FAIL_OPEN_LOG_EVERY_S = 10.0
"""Warnings about an outage (and fail_open admissions) are logged at most this often."""
MAX_CONNECTIONS = 64
"""Connections per replica; callers beyond this wait for one (within CALL_TIMEOUT_S)."""
CLOSE_GRACE_S = 1.0
"""On close, how long pending lease releases may take before they are abandoned."""


class LeaseHolder(Protocol):
    channel: str
    """Where releases of its limit are announced (`key("released", name)`)."""

    async def renew(self) -> None: ...

    def wake(self) -> None:
        """Units of its limit were released somewhere: the queue head should ask again."""


class RedisState:
    def __init__(self, config: StateConfig) -> None:
        self.config = config
        self.fail_open = config.on_error == "fail_open"
        client = connect(config.redis_url, CALL_TIMEOUT_S, MAX_CONNECTIONS)
        self.client = client.redis
        self._aclose = client.aclose
        self.where = client.where
        self._lease_ids = map(f"{os.urandom(6).hex()}:{{}}".format, itertools.count())
        self._down_until = 0.0
        self._down = False
        self._down_logged_at = float("-inf")
        self._fail_open_count = 0
        self._fail_open_logged_at = float("-inf")
        self._holders: weakref.WeakSet[LeaseHolder] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._users = 1

    # ----------------------------------------------------------------- lifetime

    def retain(self) -> RedisState:
        """Another admission (the next config's) shares this state; it owes a `close()`."""
        self._users += 1
        return self

    async def close(self) -> None:
        """The last user gone: stop renewing, give pending releases a moment, disconnect."""
        self._users -= 1
        if self._users > 0:
            return
        loops = [task for task in (self._renewer, self._listener) if task is not None]
        for task in loops:
            task.cancel()
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_GRACE_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*loops, *self._tasks, return_exceptions=True)
        await self._aclose()

    @property
    def up(self) -> bool:
        """False from a failed call until a call succeeds again (`streamgate_shared_state_up`,
        and a /readyz reason). With no calls in between, the last answer stands."""
        return not self._down

    # ----------------------------------------------------------------- calls

    def script(self, source: str) -> AsyncScript:
        return self.client.register_script(source)

    def key(self, *parts: str) -> str:
        return ":".join((KEY_PREFIX, *parts))

    def new_lease_id(self) -> str:
        """Unique across replicas: a random replica prefix and a counter."""
        return next(self._lease_ids)

    async def call(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one Lua script; StateUnavailable when Redis is down, slow or broken."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            raise StateUnavailable(f"redis at {self.where} is unreachable")
        try:
            async with asyncio.timeout(CALL_TIMEOUT_S):
                result = await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(loop.time(), exc)
            raise StateUnavailable(f"redis at {self.where} is unreachable") from None
        if self._down:
            self._down = False
            log.info("redis at %s is reachable again", self.where)
        return result

    def _went_down(self, now: float, exc: BaseException) -> None:
        self._down_until = now + DOWN_FOR_S
        self._down = True
        if now - self._down_logged_at >= FAIL_OPEN_LOG_EVERY_S:
            self._down_logged_at = now
            policy = "admitting under per-replica limits" if self.fail_open else "rejecting"
            log.warning(
                "redis at %s is unreachable (%s); %s (state.on_error: %s)",
                self.where, _describe(exc), policy, self.config.on_error,
            )

    async def call_or_undo(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        undo: Callable[[Any], None],
    ) -> Any:
        """`call`, for calls that take something: if the caller is cancelled while Redis works,
        the call still completes and `undo` gets its result, so nothing is taken for nobody."""
        task = self.spawn(self.call(script, keys, args))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: t.cancelled() or t.exception() or undo(t.result()))
            raise

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task that `close()` waits for (briefly) and then cancels."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn_quietly(self, call: Awaitable[Any]) -> None:
        """A best-effort call in the background (a release, a refund): when Redis is down it is
        dropped, and expiry (lease TTL, bucket refill) makes up for it."""
        self.spawn(_ignoring_unavailable(call))

    # ----------------------------------------------------------------- policy

    def degrade(self, exc: StateUnavailable) -> None:
        """Redis failed a limit's call: raise (fail_closed: 503), or return and let the limit
        count this request in its per-replica copy (fail_open)."""
        if not self.fail_open:
            exc.retry_after = DOWN_FOR_S
            raise exc
        self._fail_open_count += 1
        now = asyncio.get_running_loop().time()
        if now - self._fail_open_logged_at >= FAIL_OPEN_LOG_EVERY_S:
            log.warning(
                "redis at %s is unreachable: fail_open decided %d admission checks with "
                "per-replica limits since the last report",
                self.where,
                self._fail_open_count,
            )
            self._fail_open_logged_at = now
            self._fail_open_count = 0

    # ----------------------------------------------------------------- leases

    def register(self, holder: LeaseHolder) -> None:
        """Renew `holder`'s leases every lease_ttl / 3, and wake it when units of its limit are
        released on any replica, for as long as it lives."""
        self._holders.add(holder)
        if self._renewer is None:
            loop = asyncio.get_running_loop()
            self._renewer = loop.create_task(self._renew_forever())
            self._listener = loop.create_task(self._listen_forever())

    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        period = self.config.lease_ttl / 3
        next_at = loop.time() + period
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at + period, loop.time())  # late (a busy loop): not in bursts
            renewals = [holder.renew() for holder in list(self._holders)]
            for result in await asyncio.gather(*renewals, return_exceptions=True):
                if isinstance(result, Exception):  # a bug; renewing must go on regardless
                    log.error("lease renewal failed", exc_info=result)

    async def _listen_forever(self) -> None:
        """Release announcements, so a waiting head asks again at once instead of at its next
        poll. Best effort: when the subscription is down, waiters still poll."""
        pattern = self.key("released", "*")
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.psubscribe(pattern)
                self._wake_all()  # announcements may have been missed while unsubscribed
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is not None:
                        self._wake(message["channel"].decode())
            except (RedisError, OSError):
                pass
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(DOWN_FOR_S)

    def _wake(self, channel: str) -> None:
        for holder in list(self._holders):
            if holder.channel == channel:
                holder.wake()

    def _wake_all(self) -> None:
        for holder in list(self._holders):
            holder.wake()


async def _ignoring_unavailable(call: Awaitable[Any]) -> None:
    with contextlib.suppress(StateUnavailable):
        await call


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
