"""Which upstream message ends an answer (`AnswerEnd`), as a test on one message's payload.

A WebSocket session's answers and a WebSocket upstream bridged to SSE both need it: the first
to know when `chunk_gap` stops applying, the second to end the SSE stream cleanly. It runs on
every upstream message, so each test looks at the bytes first and parses JSON only for a
message that could be the end: an OpenAI chunk says `"finish_reason":null` on every token.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from gateway.config.routes import AnswerEnd

EndTest = Callable[[bytes], bool]

_FINISH = b'"finish_reason"'


def end_test(end: AnswerEnd | None) -> EndTest | None:
    """The test for `end`; None when no message ends an answer."""
    if end is None:
        return None
    if end.kind == "finish_reason":
        return finish_reason_set
    return _fields_test(dict(end.match))


def finish_reason_set(payload: bytes) -> bool:
    """An OpenAI chat-completion chunk one of whose choices has a `finish_reason`."""
    at = payload.find(_FINISH)
    while at >= 0:
        value = payload[at + len(_FINISH) : at + len(_FINISH) + 12].lstrip(b" \t:")
        if not value.startswith(b"null"):
            return _choice_finished(_json(payload))
        at = payload.find(_FINISH, at + 1)
    return False


def _choice_finished(payload: object) -> bool:
    if not isinstance(payload, dict):
        return False
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return False
    return any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _fields_test(fields: dict[str, str]) -> EndTest:
    needles = [value.encode() for value in fields.values()]

    def has_fields(payload: bytes) -> bool:
        if not all(needle in payload for needle in needles):
            return False
        parsed = _json(payload)
        return isinstance(parsed, dict) and all(parsed.get(k) == v for k, v in fields.items())

    return has_fields


def _json(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):  # not JSON (or too deep to be worth it): not the end
        return None
