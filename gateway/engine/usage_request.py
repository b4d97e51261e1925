"""Asking the upstream for a stream's token usage when the client did not.

A request a token budget charged is settled to the upstream's `usage`. An OpenAI-style stream
reports it only when asked (`stream_options: {"include_usage": true}`), in one last event whose
`choices` is empty. When the client did not ask, the gateway asks here, once per request and
before the first try, so every retry and fallback sends the same body; the relay then drops
that usage-only event (`token_watch.py`), so the client gets the bytes it would have got.

Left as sent: a body that is not a JSON object, a request without `"stream": true`, a path
other than the OpenAI completion endpoints (`.../completions`, `.../chat/completions`: the ones
that know `stream_options`), and a client that asked for usage itself (it gets it, whole).
"""

from __future__ import annotations

import json

from gateway.engine.context import RequestContext

_ASK = b'"stream_options":{"include_usage":true},'


def asks_for_usage(path: str, payload: dict | None) -> bool:
    """Whether the gateway adds include_usage to this request (and hides what it brings)."""
    if not isinstance(payload, dict) or payload.get("stream") is not True:
        return False
    if not path.split("?", 1)[0].endswith("/completions"):
        return False
    options = payload.get("stream_options")
    if options is None:
        return True
    return isinstance(options, dict) and options.get("include_usage") is not True


def ask_for_usage(ctx: RequestContext) -> None:
    """Rewrite the request's body (and its parsed form) to ask for usage, where it should."""
    payload = ctx.json
    if not asks_for_usage(ctx.path, payload):
        return
    if "stream_options" not in payload and ctx.body[:1] == b"{":
        # The common case: one member in front, the client's own bytes kept after it.
        ctx.body = b"{" + _ASK + ctx.body[1:]
        ctx.json = {"stream_options": {"include_usage": True}, **payload}
    else:  # stream_options null or without include_usage (or odd leading bytes): re-encoded
        options = payload.get("stream_options") or {}
        ctx.json = {**payload, "stream_options": {**options, "include_usage": True}}
        ctx.body = json.dumps(ctx.json).encode()
    ctx.hide_usage = True
