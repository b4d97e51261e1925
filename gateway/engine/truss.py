"""Baseten Truss Chains typed byte streams, as the gateway sees them.

A stream is a run of frames, each a 5-byte tag (one byte kind, then the payload's length as a
4-byte big-endian integer) and the payload: HEADER=2 at most once first, ITEM=3 any number of
times, FOOTER=4 at most once last. `truss_chains.streaming`'s reader treats a body that ends
between frames as a clean end, so the gateway must never end a cut stream cleanly.
"""

from __future__ import annotations

TAG_SIZE = 5
HEADER, ITEM, FOOTER, END = 2, 3, 4, 5


class Seen:
    """What a scan has met so far in one stream."""

    __slots__ = ("items", "footer")

    def __init__(self) -> None:
        self.items = 0
        self.footer = False


def scan(data: bytes, seen: Seen) -> tuple[int, int]:
    """(end of the last complete frame in `data`, frames before it), noting in `seen` the
    items and footer met."""
    at, frames, size = 0, 0, len(data)
    while at + TAG_SIZE <= size:
        end = at + TAG_SIZE + int.from_bytes(data[at + 1 : at + TAG_SIZE], "big")
        if end > size:
            break
        kind = data[at]
        if kind == ITEM:
            seen.items += 1
        elif kind == FOOTER:
            seen.footer = True
        frames += 1
        at = end
    return at, frames


def frame(kind: int, payload: bytes) -> bytes:
    """One frame (for tests and the fake worker)."""
    return bytes([kind]) + len(payload).to_bytes(4, "big") + payload
