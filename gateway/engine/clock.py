"""The deadlines of one committed stream, kept by a single lazily re-armed timer.

A two-way session (WebSocket) may rest between answers: with `idle` given, the upstream's
silence is bounded by `first_chunk` from a client message (`asked`) until the upstream's next
message, by `chunk_gap` between the messages of an answer in progress (`answering`), and by
`idle` otherwise; `chunk_gap` bounds one-way streams.

`chunk_gap`, `slow_client`, `total` and `keepalive` are not a timeout object per await: the
relay only stores when its current phase began (`since`) and whether it is reading from the
upstream or waiting for the client, and the timer wakes at the earliest deadline to re-arm,
to send a keepalive, or to end the stream by cancelling the task that relays it.
"""

from __future__ import annotations

import asyncio

from gateway.config.routes import Route
from gateway.errors import GatewayError, SlowClient, UpstreamTimeout


class StreamClock:
    """The deadlines of one committed stream, kept by a single lazily re-armed timer."""

    __slots__ = (
        "reading",
        "asked",
        "answering",
        "_idle",
        "_first_chunk",
        "since",
        "reason",
        "_loop",
        "_task",
        "_handle",
        "_chunk_gap",
        "_slow_client",
        "_deadline",
        "_keepalive",
        "_keepalive_after",
        "_send_keepalive",
    )

    def __init__(
        self,
        route: Route,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
        send_keepalive=None,
        idle: float | None = None,
    ) -> None:
        self._loop = loop
        self._task = asyncio.current_task(loop)
        self.reading = True
        """True while waiting on the upstream (chunk_gap applies), False while writing
        to the client (slow_client applies)."""
        self.since = self._loop.time()
        """When the current phase began."""
        self.reason: GatewayError | None = None
        self.asked = False
        """A session's client message awaits the upstream's next message (see `ask`)."""
        self.answering = False
        """A session's answer is in progress: its next message is due within `chunk_gap`
        (set by the relay from the framing, on each upstream message)."""
        self._idle = idle
        self._first_chunk = route.timeouts.first_chunk
        self._chunk_gap = route.timeouts.chunk_gap
        self._slow_client = route.timeouts.slow_client
        self._deadline = deadline
        self._keepalive = route.keepalive if send_keepalive is not None else None
        self._keepalive_after = self.since
        self._send_keepalive = send_keepalive
        self._handle = None
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def pause(self) -> None:
        """Keep no time while a resume asks another backend (its try has its own bounds);
        `fire` still ends the stream (shutdown)."""
        self.stop()
        self.reason = None

    def restart(self) -> None:
        """Keep time again, from now: a continuation is being relayed."""
        now = self._loop.time()
        self.reading, self.since, self._keepalive_after = True, now, now
        self._arm()

    def ask(self) -> None:
        """A client message went upstream: its answer must begin within `first_chunk`. The
        relay clears `asked` on the upstream's next message."""
        if not self.asked:
            self.asked = True
            if self.reading:  # while writing to the client, slow_client's phase goes on
                self.since = self._loop.time()

    def _silence_limit(self) -> float:
        if self._idle is None or (self.answering and not self.asked):
            return self._chunk_gap
        return self._first_chunk if self.asked else self._idle

    def _arm(self) -> None:
        # The phase may change while the timer sleeps, to one with a shorter limit; waking at
        # least every min(limit) catches that in time, because a phase that began after this
        # arm began after `now`.
        silence = self._silence_limit()
        limit = silence if self.reading else self._slow_client
        now = self._loop.time()
        shortest = min(self._chunk_gap, self._slow_client, self._first_chunk)
        due = min(self.since + limit, now + shortest, self._deadline)
        if self._keepalive is not None and self.reading:
            due = min(due, max(self.since, self._keepalive_after) + self._keepalive)
        self._handle = self._loop.call_at(due, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._deadline:
            return self.fire(UpstreamTimeout("the stream ran out of total time", "total_timeout"))
        if self.reading and now - self.since >= self._silence_limit():
            return self.fire(self._silence(now - self.since))
        if not self.reading and now - self.since >= self._slow_client:
            return self.fire(SlowClient("the client stopped reading"))
        if (
            self._keepalive is not None
            and self.reading
            and now - max(self.since, self._keepalive_after) >= self._keepalive
        ):
            self._keepalive_after = now  # keepalives do not reset chunk_gap
            self._send_keepalive()
        self._arm()

    def _silence(self, seconds: float) -> UpstreamTimeout:
        if self._idle is None:
            return UpstreamTimeout(f"upstream silent for {seconds:.1f}s", "chunk_gap_timeout")
        if self.answering and not self.asked:
            message = f"upstream silent for {seconds:.1f}s in the middle of an answer"
            return UpstreamTimeout(message, "chunk_gap_timeout")
        if self.asked:
            message = f"no upstream answer within {seconds:.1f}s"
            return UpstreamTimeout(message, "first_chunk_timeout")
        return UpstreamTimeout(f"session idle for {seconds:.1f}s", "idle_timeout")

    def fire(self, reason: GatewayError) -> None:
        """End the stream now with `reason` (the timer's deadlines, or draining at shutdown)."""
        self.stop()
        if self.reason is None and self._task is not None:
            self.reason = reason
            self._task.cancel()
