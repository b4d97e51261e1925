"""Watching one stream's tokens for its token budgets, batch of whole frames by batch.

The relay builds a `TokenWatch` only for a stream that needs one: the gateway asked for usage
the client did not (`usage_request.py`), or a budget caps it (`max_tokens_per_stream`). Every
other stream pays nothing per chunk. Before each batch of whole frames is written, the watch
- drops what the gateway's question brought: the usage-only event (settlement still reads it:
  the relay keeps the frames that mention usage before they come here) and the
  `"usage":null` member OpenAI adds to every other chunk once usage is asked for;
- counts what the stream produced: one token per frame relayed (as settlement counts without
  usage), or the upstream's `usage.completion_tokens` once it arrives, whichever is larger;
- past the cap, raises `TokenCapExceeded` instead of letting the batch through, so the relay
  ends the stream as after any failure past the commit point (an SSE `event: error`, never a
  `[DONE]`; the upstream connection closed). The first frames are the commit point itself:
  they are relayed whatever they count, and a cap they pass ends the stream at the next batch.
"""

from __future__ import annotations

import re

from gateway.config.routes import Route
from gateway.engine.chunk_step import USAGE_KEY
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened
from gateway.engine.framing import Framing, choose
from gateway.errors import TokenCapExceeded

_NULL_USAGE = b',"usage":null'
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


class TokenWatch:
    __slots__ = ("framing", "hide", "cap", "produced", "reported")

    def __init__(self, framing: Framing, hide: bool, cap: float) -> None:
        self.framing = framing
        self.hide = hide
        self.cap = cap
        self.produced = 0
        """Frames relayed so far."""
        self.reported = 0
        """The largest `usage.completion_tokens` the upstream reported so far."""

    def first(self, frames: bytes) -> bytes:
        """The commit point's frames, as they are to be relayed."""
        if frames.partition(USAGE_KEY)[1]:  # not `in`: see chunk_step.py
            frames = self._usage(frames)
        self.produced += self.framing.frames
        return frames

    def __call__(self, frames: bytes) -> bytes:
        """The next frames, as they are to be relayed (b"" when none is left)."""
        frames = self.first(frames)
        if self.produced > self.cap or self.reported > self.cap:
            produced = max(self.produced, self.reported)
            raise TokenCapExceeded(
                f"the stream produced {produced} tokens, over its cap of {self.cap} "
                "(max_tokens_per_stream)"
            )
        return frames

    def _usage(self, frames: bytes) -> bytes:
        if self.hide and _NULL_USAGE in frames:
            frames = frames.replace(_NULL_USAGE, b"")
        if _USAGE_OBJECT.search(frames) is None:
            return frames
        found = self.framing.usage(frames)
        if found is not None:
            self.reported = max(self.reported, found[1])
        if self.hide:
            frames, dropped = self.framing.drop_usage_only(frames)
            self.framing.frames -= dropped
        return frames


def token_watch(ctx: RequestContext, framing: Framing) -> TokenWatch | None:
    """The watch a committed stream needs, or None."""
    hide = ctx.hide_usage and framing.watches_usage
    if not ctx.stream or not (hide or ctx.token_cap is not None):
        return None
    return TokenWatch(framing, hide, ctx.token_cap or float("inf"))


def hide_in_whole_answer(ctx: RequestContext, opened: Opened, route: Route) -> None:
    """A whole answer to a request whose usage the gateway asked for (a stream that ended
    before any content, relayed as it was held back): its usage read, its usage-only event
    dropped, as the relay does for a stream."""
    framing = choose(route.framing, opened.headers, stream=True)
    if opened.status >= 400 or not framing.watches_usage or not framing.cut(opened.head):
        return
    ctx.usage = framing.usage(opened.head)
    opened.head = framing.drop_usage_only(opened.head)[0]
