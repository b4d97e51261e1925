"""Token counts from an upstream's OpenAI-style `usage` object (stream or whole body)."""

from __future__ import annotations

import json


def from_body(body: bytes) -> tuple[int, int] | None:
    if b'"usage"' not in body:
        return None
    try:
        return _counts(json.loads(body))
    except ValueError:
        return None


def from_sse(events: bytes, sep: bytes) -> tuple[int, int] | None:
    """The last usage object among these complete events (include_usage puts it near the end)."""
    for event in reversed(events.split(sep)):
        if b'"usage"' not in event:
            continue
        for line in event.splitlines():
            if line.startswith(b"data:"):
                try:
                    found = _counts(json.loads(line[5:]))
                except ValueError:
                    continue
                if found is not None:
                    return found
    return None


def drop_usage_only(events: bytes, sep: bytes) -> tuple[bytes, int]:
    """`events` (SSE events) without the usage-only ones, the event include_usage adds at a
    stream's end (`choices` empty, a `usage` object), and how many were dropped."""
    parts = events.split(sep)
    kept = [event for event in parts if not _usage_only(event)]
    dropped = len(parts) - len(kept)
    return (sep.join(kept), dropped) if dropped else (events, 0)


def _usage_only(event: bytes) -> bool:
    if b'"usage"' not in event:
        return False
    data = b"\n".join(line[5:] for line in event.splitlines() if line.startswith(b"data:"))
    try:
        payload = json.loads(data)
    except ValueError:
        return False
    return (
        isinstance(payload, dict)
        and payload.get("choices") == []
        and isinstance(payload.get("usage"), dict)
    )


def _counts(payload: object) -> tuple[int, int] | None:
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None
