"""What a client of an OpenAI-style chat completion stream has been sent: the text, and its id.

A resume (resume.py) asks another backend to continue exactly this text, so it is taken from
the events as they are relayed, choice 0's `delta.content` each. It is bounded: past
`max_prefix_bytes` (UTF-8) the transcript gives up and the stream is no longer resumable.
A stream is not resumable either when it says something a resume could not carry on: tool
calls, a second choice, an event that is not a chat completion chunk (an error object).
Parsing costs one `json.loads` per event, and only on routes with `resume:`.
"""

from __future__ import annotations

import json

DONE = object()
"""The payload of `data: [DONE]`."""
OTHER = object()
"""A payload that is not JSON."""


def payload_of(event: bytes) -> object | None:
    """An event's `data:` as JSON, DONE, OTHER, or None for an event with no data (a
    comment, a keepalive)."""
    lines = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    data = b"\n".join(line[1:] if line[:1] == b" " else line for line in lines)
    if data.strip() == b"[DONE]":
        return DONE
    try:
        return json.loads(data)
    except ValueError:
        return OTHER


def first_choice(payload: dict) -> tuple[dict | None, str, object]:
    """(choice 0's delta, its content, its finish_reason) of a chunk; (None, "", None) for a
    chunk with no choices (the usage chunk)."""
    choices = payload.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, "", None
    delta = choices[0].get("delta")
    if not isinstance(delta, dict):
        delta = {}
    content = delta.get("content")
    return delta, content if isinstance(content, str) else "", choices[0].get("finish_reason")


class Transcript:
    __slots__ = ("limit", "parts", "size", "id", "finished", "usable")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.id: str | None = None
        """The id of the stream's chunks: the one the client keeps seeing after a resume."""
        self.finished = False
        """A `finish_reason` or `[DONE]` was relayed: the answer is whole."""
        self.usable = True

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def resumable(self) -> bool:
        return self.usable and not self.finished and self.size > 0

    def feed(self, events: bytes, sep: bytes) -> None:
        """Note what these whole events, about to be relayed, say."""
        if not self.usable or not events:
            return
        for event in events.split(sep):
            if event:
                self._note(payload_of(event))

    def _note(self, payload: object) -> None:
        if payload is None:
            return
        if payload is DONE:
            self.finished = True
            return
        if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
            self.usable = False  # an error object, or another API: not ours to continue
            return
        if self.id is None and isinstance(payload.get("id"), str):
            self.id = payload["id"]
        choices = payload["choices"]
        delta, content, finish = first_choice(payload)
        if len(choices) > 1 or (delta is not None and _not_text(delta, choices[0])):
            self.usable = False
            return
        self.add(content)
        if finish is not None:
            self.finished = True

    def add(self, text: str) -> None:
        if not text or not self.usable:
            return
        self.size += len(text.encode())
        if self.size > self.limit:
            self.usable, self.parts = False, []
        else:
            self.parts.append(text)


def _not_text(delta: dict, choice: dict) -> bool:
    """A delta a text continuation could not carry on."""
    return (
        choice.get("index", 0) != 0
        or bool(delta.get("tool_calls"))
        or bool(delta.get("function_call"))
    )
