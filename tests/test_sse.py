"""Which SSE events carry content, and so commit a stream (the role-only first delta does not)."""

from __future__ import annotations

import json

import pytest

from gateway.engine import sse


def event(payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def delta(**fields) -> dict:
    return {"choices": [{"index": 0, "delta": fields, "finish_reason": None}]}


@pytest.mark.parametrize(
    "raw, expected",
    [
        (event(delta(role="assistant", content="")), False),
        (event(delta(content="hi")), True),
        (b'data: {"choices":[{"delta":{"content": "spaced"}}]}\n\n', True),
        (event(delta(content=None)), False),
        (event(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"content":"x"}'}}])), True),
        (event(delta(role="assistant", content="", refusal=None)), False),
        (event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}), False),
        (event({"choices": [], "usage": {"prompt_tokens": 1}}), False),
        (event({"choices": [{"text": "completion text"}]}), True),
        (event({"error": {"message": "boom"}}), True),
        (b"data: [DONE]\n\n", False),
        (b": keepalive comment\n\n", False),
        (b"data: {not json\n\n", True),
        (event(delta(content='quote \\" inside')), True),
    ],
    ids=[
        "role-only", "content", "content-spaced", "content-null", "tool-call", "refusal-null",
        "finish-only", "usage-only", "completions-text", "error-object", "done", "comment",
        "not-json", "escaped-quote",
    ],
)
def test_an_event_commits_only_when_it_carries_content(raw, expected):
    assert sse.has_content(raw, b"\n\n") is expected


def test_split_complete_holds_the_partial_tail():
    assert sse.split_complete(b"data: a\n\ndata: b", b"\n\n") == (b"data: a\n\n", b"data: b")
    assert sse.split_complete(b"data: a", b"\n\n") == (b"", b"data: a")
