"""`asyncio.timeout_at` for a loop and task already in hand.

asyncio's own asks for the running loop and task on entry and on every `reschedule`, and on
Python 3.11 each of those asks is a getpid system call: a try, which reschedules once, paid
three. This keeps asyncio's semantics exactly: on expiry the task is cancelled, and that
cancellation (only that one) leaves the block as `TimeoutError`; a cancellation from
elsewhere (the client gone) passes through as itself, even if the deadline fired as well.
"""

from __future__ import annotations

import asyncio


class Deadline:
    __slots__ = ("_loop", "_task", "_handle", "_expired", "_cancelling")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._loop = loop
        self._task = asyncio.current_task(loop)
        self._expired = False
        self._handle = loop.call_at(when, self._expire)
        self._cancelling = 0

    async def __aenter__(self) -> Deadline:
        self._cancelling = self._task.cancelling()
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._handle.cancel()
        if (
            self._expired
            and exc_type is asyncio.CancelledError
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc

    def reschedule(self, when: float) -> None:
        """Move the deadline (only before it has expired)."""
        if not self._expired:
            self._handle.cancel()
            self._handle = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()
