"""What the gateway understands of server-sent events: boundaries, and which events carry content.

The commit point of an SSE stream is the first event with content. OpenAI-style streams open
with a role-only delta (`{"role": "assistant", "content": ""}`) that says nothing yet; holding
it back lets a backend that sends headers and a role delta and then stalls be failed over.
"""

from __future__ import annotations

import json

from gateway.errors import GatewayError, error_body

LF_SEPARATOR = b"\n\n"
CRLF_SEPARATOR = b"\r\n\r\n"


def separator_of(data: bytes) -> bytes:
    """The event separator a stream uses, judged from its first bytes (LF when unsure)."""
    return CRLF_SEPARATOR if CRLF_SEPARATOR in data else LF_SEPARATOR


def has_separator(data: bytes) -> bool:
    return LF_SEPARATOR in data or CRLF_SEPARATOR in data


def split_complete(data: bytes, sep: bytes) -> tuple[bytes, bytes]:
    """(complete events, partial tail): the tail is held until its event is whole."""
    cut = data.rfind(sep)
    if cut < 0:
        return b"", data
    end = cut + len(sep)
    return data[:end], data[end:]


def loads_json(data: bytes):
    """`json.loads`, with the decoding of UTF-8 (what nearly every body is) done first: given
    bytes, json.loads first guesses the encoding in Python. Raises ValueError."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return json.loads(data)  # UTF-16 or UTF-32, which JSON allows
    return json.loads(data if text[:1] == "\ufeff" else text)  # json.loads drops a BOM


_scan = json.JSONDecoder().scan_once
"""The C scanner behind `json.loads`: one JSON value at an offset."""


def _event_json(data: bytes):
    """`loads_json` for the commit check, which parses the opening event of nearly every
    stream: data that is exactly one UTF-8 JSON value (what backends send) goes to the C
    scanner without json.loads's wrappers; anything else takes loads_json, errors and all."""
    try:
        text = data.decode()
        value, end = _scan(text, 0)
    except (StopIteration, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return loads_json(data)
    return value if end == len(text) else loads_json(data)


def has_content(events: bytes, sep: bytes) -> bool:
    """Whether any complete event in `events` carries content (and so commits the stream)."""
    return any(event and _event_has_content(event) for event in events.split(sep))


def _event_has_content(event: bytes) -> bool:
    if _has_nonempty_content(event):
        return True  # the common first token, judged without parsing JSON
    data_lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not data_lines:
        return False  # comments, or an event with no data
    data = b"\n".join(data_lines)
    if data.strip() == b"[DONE]":
        return False
    try:
        payload = _event_json(data)
    except ValueError:
        return True  # not ours to judge: relay it
    if not isinstance(payload, dict) or "choices" not in payload:
        return True  # an error object, or another API's event: it is something to say
    return any(_choice_has_content(c) for c in payload["choices"] or ())


def _choice_has_content(choice: object) -> bool:
    if not isinstance(choice, dict):
        return True
    if choice.get("text"):
        return True  # /v1/completions
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return False
    return bool(
        delta.get("content")
        or delta.get("tool_calls")
        or delta.get("function_call")
        or delta.get("refusal")
        or delta.get("reasoning_content")
    )


_CONTENT_KEY = b'"content":'


def _has_nonempty_content(event: bytes) -> bool:
    """A `"content": "x..."` pair with a non-empty string, by bytes alone."""
    at = event.find(_CONTENT_KEY)
    while at >= 0:
        value = event[at + len(_CONTENT_KEY) :].lstrip(b" ")
        if value[:1] == b'"' and value[1:2] not in (b'"', b""):
            return True
        at = event.find(_CONTENT_KEY, at + 1)
    return False


def error_event(err: GatewayError, request_id: str) -> bytes:
    """The event that ends a committed stream visibly (never a `[DONE]`)."""
    return b"event: error\ndata: " + json.dumps(error_body(err, request_id)).encode() + b"\n\n"
