"""Weighted concurrency shared by every replica: leases in Redis.

Per limit, Redis holds the leases (a sorted set of lease ids scored by expiry, and a hash of
the units each holds) and a queue of waiting tickets. One Lua script decides atomically: drop
expired leases and tickets, add up the units in use, and grant a lease only to the head of the
shared queue (or to anyone while nobody queues) when its units fit. So the queue is FIFO across
replicas, and a heavy request at its head is not starved by light ones from another replica.

On each replica, requests wait in a local FIFO first (in the order they joined it; requests
arriving within one Redis round trip of each other count as simultaneous). A single pump task
takes the local head into the shared queue and asks again whenever units are released: at once
for releases announced on the limit's pub/sub channel (any replica's), and every POLL_S in any
case (leases that expire are not announced, and the subscription may be down). Only the pump
talks to Redis for waiters, so a waiter that gives up never races a grant.

A lease lives `state.lease_ttl` unless renewed; the state's renewer refreshes this replica's
leases every ttl/3, so units held by a replica that dies come back within the TTL. Renewal is an
upsert: after Redis restarts empty, units still held are counted again within ttl/3.

While Redis is unreachable under fail_open, this replica enforces the whole capacity on its own
(its holdings get lease ids all the same, and are registered by the first renewal that works).
`in_use` and `waiting` are this replica's; summed over replicas they give the shared picture.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from gateway.admission.lease_scripts import ACQUIRE, RELEASE, RENEW
from gateway.admission.redis_state import RedisState
from gateway.config.model import ConcurrencyLimit
from gateway.errors import Overloaded, StateUnavailable, queue_timed_out

log = logging.getLogger("streamgate.state")

POLL_S = 0.05
"""How often a waiting head asks again when no release announcement wakes it."""

class _Waiter:
    __slots__ = ("lease", "units", "future", "ticketed")

    def __init__(self, lease: str, units: int, future: asyncio.Future[str]) -> None:
        self.lease = lease
        self.units = units
        self.future = future
        self.ticketed = False
        """It may have a place in the shared queue, to give back if it leaves."""


class GlobalSemaphore:
    def __init__(
        self,
        name: str,
        config: ConcurrencyLimit,
        state: RedisState,
        observe_wait: Callable[[float], None],
    ) -> None:
        self.name = name
        self.capacity = config.capacity
        self.max_queue = config.max_queue
        self.backend = state
        self.in_use = 0
        """Units held by requests on this replica."""
        self.waiting = 0
        """Requests queued on this replica."""
        self._state = state
        self._observe_wait = observe_wait
        self._held: dict[str, int] = {}
        self._waiters: deque[_Waiter] = deque()
        self._changed = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._keys = tuple(
            state.key("concurrency", "{" + name + "}", part)
            for part in ("leases", "units", "queue", "queue-expiry", "queue-seq")
        )
        self._lease_ttl_ms = round(state.config.lease_ttl * 1000)
        # A queue place is refreshed every POLL_S while its replica lives; one left by a dead
        # replica blocks the shared queue until it expires, so it expires quickly.
        self._ticket_ttl_ms = max(500, min(2000, self._lease_ttl_ms))
        self.channel = state.key("released", name)
        self._acquire = state.script(ACQUIRE)
        self._release = state.script(RELEASE)
        self._renew = state.script(RENEW)
        state.register(self)

    def resize(self, capacity: int, max_queue: int) -> None:
        self.capacity, self.max_queue = capacity, max_queue
        self._changed.set()

    def wake(self) -> None:
        self._changed.set()

    # ----------------------------------------------------------------- acquire

    async def acquire(self, units: int, timeout: float) -> str:
        lease = self._state.new_lease_id()
        if not self.waiting and await self._try_at_once(lease, units):
            return lease
        if self.waiting >= self.max_queue:
            raise Overloaded(f"concurrency limit {self.name!r} has a full queue", retry_after=1)
        loop = asyncio.get_running_loop()
        waiter = _Waiter(lease, units, loop.create_future())
        self._waiters.append(waiter)
        self.waiting += 1
        if self._pump is None or self._pump.done():
            self._pump = self._state.spawn(self._serve_queue())
        started = loop.time()
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except BaseException as exc:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(lease)  # granted in the same instant it gave up
            self._changed.set()  # the pump may be waiting on it at the head
            if isinstance(exc, TimeoutError):
                raise queue_timed_out(self.name, timeout) from None
            raise
        finally:
            self.waiting -= 1
            self._observe_wait(loop.time() - started)

    async def _try_at_once(self, lease: str, units: int) -> bool:
        """Nobody waits here: one call, without taking a place in the shared queue."""
        try:
            granted, _ = await self._state.call_or_undo(
                self._acquire,
                self._keys,
                self._args(lease, units, queue=False),
                undo=lambda result: result[0] and self._forget(lease),
            )
        except StateUnavailable as exc:
            self._state.degrade(exc)
            granted = self.in_use + units <= self.capacity
        if granted:
            self._hold(lease, units)
        return bool(granted)

    def _args(self, lease: str, units: int, queue: bool) -> tuple:
        return (
            lease,
            units,
            self.capacity,
            self._lease_ttl_ms,
            self._ticket_ttl_ms,
            int(queue),
            self.channel,
        )

    # ----------------------------------------------------------------- the pump

    async def _serve_queue(self) -> None:
        """Serve the local queue head first, until the queue is empty."""
        try:
            while self._waiters:
                head = self._waiters[0]
                if head.future.done():  # gave up
                    self._waiters.popleft()
                    if head.ticketed:
                        self._forget(head.lease)
                    continue
                self._changed.clear()
                if await self._try_queued(head):
                    self._waiters.popleft()
                    self._grant(head)
                    continue
                if not head.future.done():
                    try:
                        async with asyncio.timeout(POLL_S):
                            await self._changed.wait()
                    except TimeoutError:
                        pass
        except BaseException as exc:
            # Closing (or a bug): nobody may be left waiting on a pump that is gone.
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("concurrency limit %r: the queue pump failed", self.name)
            error = StateUnavailable(f"concurrency limit {self.name!r} stopped serving its queue")
            for waiter in self._waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(error)
            self._waiters.clear()
            raise
        finally:
            self._pump = None

    async def _try_queued(self, head: _Waiter) -> bool:
        head.ticketed = True  # set before the call: a call cut short may still have queued it
        try:
            granted, _ = await self._state.call(
                self._acquire, self._keys, self._args(head.lease, head.units, queue=True)
            )
            return bool(granted)
        except StateUnavailable as exc:
            try:
                self._state.degrade(exc)
            except StateUnavailable:
                self._waiters.popleft()
                if not head.future.done():
                    head.future.set_exception(exc)
                head.ticketed = False
                return False
            if self.in_use + head.units > self.capacity:
                return False
            if head.ticketed:  # a place it may hold in the shared queue would block others
                self._forget(head.lease)
            return True

    def _grant(self, waiter: _Waiter) -> None:
        self._hold(waiter.lease, waiter.units)
        if waiter.future.done():  # gave up while Redis answered
            self.release(waiter.lease)
        else:
            waiter.future.set_result(waiter.lease)

    # ----------------------------------------------------------------- holding

    def _hold(self, lease: str, units: int) -> None:
        self._held[lease] = units
        self.in_use += units

    def release(self, lease: str) -> None:
        self.in_use -= self._held.pop(lease)
        self._state.spawn(self._give_back((lease,)))

    def _forget(self, lease: str) -> None:
        """Drop, in the background, a lease or queue place that no request here holds."""
        self._state.spawn(self._give_back((lease,)))

    async def _give_back(self, leases: tuple[str, ...]) -> None:
        try:
            await self._state.call(self._release, self._keys, (self.channel, *leases))
        except StateUnavailable:
            pass  # the lease expires on its own, since nobody renews it
        finally:
            self._changed.set()  # local waiters may fit now

    async def renew(self) -> None:
        """Refresh every lease held here (called by the state's renewer)."""
        if not self._held:
            return
        renewed = list(self._held.items())
        args: list[object] = [self._lease_ttl_ms]
        for lease, units in renewed:
            args += (lease, units)
        try:
            await self._state.call(self._renew, self._keys[:2], args)
        except StateUnavailable:
            return  # the next round tries again; leases last a whole TTL
        # A lease released while the renewal was on its way may have been written back by it.
        gone = tuple(lease for lease, _ in renewed if lease not in self._held)
        if gone:
            await self._give_back(gone)
