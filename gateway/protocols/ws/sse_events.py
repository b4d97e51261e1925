"""Reading whole SSE events as a WebSocket bridge sends them: one text message per event's
`data`. The engine's SSE framing hands over whole events only."""

from __future__ import annotations

DONE = b"[DONE]"


def event_data(events: bytes) -> list[bytes]:
    """The `data` of each event in `events` (lines joined by LF), events without data left
    out (comments, keepalives, a bare `event:` line)."""
    out: list[bytes] = []
    lines: list[bytes] = []
    for line in events.replace(b"\r\n", b"\n").split(b"\n"):
        if not line:
            if lines:
                out.append(b"\n".join(lines))
                lines = []
        elif line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    if lines:
        out.append(b"\n".join(lines))
    return out
