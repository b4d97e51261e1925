"""A one-line progress bar on stderr, redrawn a few times a second from a timer task.

The load loops only bump `Progress.done`; drawing never happens on their path. When stderr
is not a terminal (CI, a pipe), one line is printed when a phase ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

_WIDTH = 28
_REDRAW_S = 0.2


class Progress:
    def __init__(self, label: str, total: int, unit: str = "streams") -> None:
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.done = 0
        self._started = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._task: asyncio.Task[None] | None = None

    def _line(self) -> str:
        frac = min(self.done / self.total, 1.0)
        bar = "█" * int(frac * _WIDTH) + "░" * (_WIDTH - int(frac * _WIDTH))
        elapsed = time.monotonic() - self._started
        return (
            f"  {self.label:<38.38} {bar} {frac:4.0%} {self.done:,.0f}/{self.total:,} {self.unit} "
            f"{elapsed:5.1f}s"
        )

    async def _redraw(self) -> None:
        while True:
            sys.stderr.write("\r" + self._line() + "\x1b[K")
            sys.stderr.flush()
            await asyncio.sleep(_REDRAW_S)

    async def __aenter__(self) -> Progress:
        self._started = time.monotonic()
        if self._tty:
            self._task = asyncio.create_task(self._redraw())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            sys.stderr.write("\r" + self._line() + "\x1b[K\n")
        else:
            sys.stderr.write(self._line() + "\n")
        sys.stderr.flush()


def say(text: str) -> None:
    """A status line between progress bars."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
