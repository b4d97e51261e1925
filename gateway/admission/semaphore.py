"""The in-process weighted FIFO semaphore, and the interface the Redis one shares."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, Protocol

from gateway.config.model import ConcurrencyLimit
from gateway.errors import Overloaded, queue_timed_out


class Semaphore(Protocol):
    name: str
    capacity: int
    in_use: int
    """Units held (on this replica)."""
    waiting: int
    """Requests (not units) queued (on this replica)."""
    backend: object | None
    """The shared state it counts in (None: this process)."""

    async def acquire(self, units: int, timeout: float) -> Hashable:
        """Take `units`, waiting in FIFO order up to `timeout` s; returns what `release` takes.
        Raises Overloaded when the queue is full or the wait expires."""
        ...

    def release(self, held: Any) -> None: ...

    def resize(self, capacity: int, max_queue: int) -> None: ...


class WeightedSemaphore:
    """A FIFO semaphore counted in units: a request takes its weight, waits its turn in order
    (so a heavy request at the head is never starved by a flood of light ones), and gives up
    after the route's queue timeout or when `max_queue` requests are already waiting."""

    backend = None

    def __init__(
        self,
        name: str,
        config: ConcurrencyLimit,
        observe_wait: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.name = name
        self.capacity = config.capacity
        self.max_queue = config.max_queue
        self.in_use = 0
        self._observe_wait = observe_wait
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def resize(self, capacity: int, max_queue: int) -> None:
        """Units in use stay held; waiters that fit the new capacity are let in."""
        self.capacity, self.max_queue = capacity, max_queue
        self._wake()

    async def acquire(self, units: int, timeout: float) -> int:
        if not self._waiters and self.in_use + units <= self.capacity:
            self.in_use += units
            return units
        if len(self._waiters) >= self.max_queue:
            raise Overloaded(f"concurrency limit {self.name!r} has a full queue", retry_after=1)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (units, waiter)
        self._waiters.append(entry)
        started = loop.time()
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return units
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self.release(units)  # granted in the same instant it gave up
            else:
                self._leave(entry)
            if isinstance(exc, TimeoutError):
                raise queue_timed_out(self.name, timeout) from None
            raise
        finally:
            self._observe_wait(loop.time() - started)

    def release(self, units: int) -> None:
        self.in_use -= units
        self._wake()

    def _leave(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        # `_wake` may already have dropped it (it drops cancelled waiters at the head).
        with contextlib.suppress(ValueError):
            self._waiters.remove(entry)
        self._wake()  # a heavy head that left may unblock lighter requests behind it

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            units, waiter = waiters[0]
            if waiter.done():  # cancelled, and about to remove itself
                waiters.popleft()
                continue
            if self.in_use + units > self.capacity:
                return
            waiters.popleft()
            self.in_use += units
            waiter.set_result(None)
