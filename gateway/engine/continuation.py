"""A resumed stream's events, rewritten so the client reads one answer with one id.

The continuation comes from another upstream request, so its events are re-encoded (compact
JSON, the client stream's event separator) with these changes:

- every chunk carries the `id` the client has seen from the start;
- events before its first content are dropped (its role-only delta: the client has had one);
- in a splice (the backend refused the prefill and answered afresh), content is consumed
  while it repeats the text already sent, and only what follows is relayed, a delta that
  straddles the boundary cut at it. Content that differs from that text, or an answer that
  ends before covering it, is `ResumeDiverged`: the stream ends with an error event, and two
  different answers are never spliced together.

Content relayed is added to the transcript, so a later resume continues all of it.
`[DONE]`, `finish_reason` and `usage` pass through from the upstream that finishes.
"""

from __future__ import annotations

import json

from gateway.engine.framing import Framing
from gateway.engine.transcript import DONE, Transcript, first_choice, payload_of
from gateway.errors import ResumeDiverged


class Continuation:
    __slots__ = ("transcript", "skip", "framing", "sep", "started")

    def __init__(self, transcript: Transcript, skip: str, framing: Framing, sep: bytes) -> None:
        self.transcript = transcript
        self.skip = skip
        """Text the continuation must repeat before anything is relayed (a splice)."""
        self.framing = framing
        """The continuation's own framing (its separator may differ from the client's)."""
        self.sep = sep
        """The client stream's event separator."""
        self.started = False

    def rewrite(self, events: bytes) -> bytes:
        """These whole events of the continuation, as the client gets them (maybe none)."""
        if not events:
            return events
        out = []
        for event in events.split(self.framing.sep):
            if event and (rewritten := self._event(event)) is not None:
                out.append(rewritten)
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        payload = payload_of(event)
        if payload is None:
            return None  # a comment: the gateway keeps its own keepalives
        if payload is DONE:
            if self.skip:
                raise _diverged("the new answer ended before the text already sent")
            self.transcript.finished = True
            return b"data: [DONE]" + self.sep
        if not isinstance(payload, dict):
            if self.skip:
                raise _diverged("the new answer is not a chat completion stream")
            return event + self.sep
        if self.transcript.id is not None and "id" in payload:
            payload["id"] = self.transcript.id
        delta, content, finish = first_choice(payload)
        if delta is None:
            return self._encode(payload)  # no choices: the usage chunk, relayed as sent
        if self.skip:
            content = self._consume(content, finish)
            if content:
                delta["content"] = content
            else:
                delta.pop("content", None)
        if not self.started:
            if not content and finish is None:
                return None  # the role-only delta, or text the client has had
            self.started = True
            delta.pop("role", None)
        self.transcript.add(content)
        if finish is not None:
            self.transcript.finished = True
        return self._encode(payload)

    def _consume(self, content: str, finish: object) -> str:
        """The part of `content` past the text still to repeat."""
        skip = self.skip
        if skip.startswith(content):
            self.skip, content = skip[len(content) :], ""
        elif content.startswith(skip):
            self.skip, content = "", content[len(skip) :]
        else:
            raise _diverged("the new answer differs from the text already sent")
        if self.skip and finish is not None:
            raise _diverged("the new answer ended before the text already sent")
        return content

    def _encode(self, payload: dict) -> bytes:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        return b"data: " + data + self.sep


def _diverged(message: str) -> ResumeDiverged:
    return ResumeDiverged(f"cannot resume the answer: {message}")
