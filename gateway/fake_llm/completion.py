"""One request's deterministic answer, in the chat or text dialect, pre-encoded for streaming.

The token text depends only on the request's `model` and prompt. Every byte of an event except
the token is encoded once per request: `Completion.token_events` splits one template around
the token, so the per-token work is picking a ready-made event.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable
from typing import Any

from .knobs import is_count


def _sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def _json(value: Any) -> bytes:
    # Compact UTF-8, as real backends send it (not \\u escapes).
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


# fmt: off
VOCAB = (
    "the ", "quick ", "brown ", "fox ", "jumps ", "over ", "lazy ", "dog ",
    "stream ", "token ", "gateway ", "proxy ", "model ", "answer ", "vector ", "signal ",
    "river ", "mountain ", "window ", "garden ", "silver ", "copper ", "orbit ", "harbor ",
    "lantern ", "meadow ", "engine ", "circuit ", "thunder ", "pebble ", "canvas ", "marble ",
    "echo ", "falcon ", "glacier ", "horizon ", "island ", "jungle ", "kernel ", "ladder ",
    "mirror ", "nectar ", "oasis ", "prism ", "quartz ", "rocket ", "saddle ", "timber ",
    "umbrella ", "velvet ", "willow ", "xenon ", "yonder ", "zephyr ", "and ", "of ",
    "to ", "is ", "a ", "in ", "café ", "naïve ", "über ", "日本 ",
)  # the last four are multi-byte UTF-8, so relays that split chunks mid-character get caught
# fmt: on
_VOCAB_JSON = tuple(_json(w) for w in VOCAB)
_MARK = "\x00token\x00"
_MARK_JSON = json.dumps(_MARK).encode()
_DONE = b"data: [DONE]\n\n"


@dataclasses.dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between /v1/chat/completions and /v1/completions."""

    id_prefix: str
    prompt_key: str
    unary_object: str
    chunk_object: str
    stream_choice: Callable[[str | None, str | None], dict[str, Any]]  # (token, finish)
    unary_choice: Callable[[str, str], dict[str, Any]]  # (text, finish)
    opening_choice: dict[str, Any] | None  # sent before the first content token


CHAT = Dialect(
    "chatcmpl-",
    "messages",
    "chat.completion",
    "chat.completion.chunk",
    stream_choice=lambda token, finish: {
        "index": 0,
        "delta": {} if token is None else {"content": token},
        "logprobs": None,
        "finish_reason": finish,
    },
    unary_choice=lambda text, finish: {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish,
    },
    opening_choice={
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    },
)
TEXT = Dialect(
    "cmpl-",
    "prompt",
    "text_completion",
    "text_completion",
    stream_choice=lambda token, finish: {
        "text": token or "",
        "index": 0,
        "logprobs": None,
        "finish_reason": finish,
    },
    unary_choice=lambda text, finish: {
        "text": text,
        "index": 0,
        "logprobs": None,
        "finish_reason": finish,
    },
    opening_choice=None,
)


def prefill_of(body: dict[str, Any]) -> str | None:
    """The text of a chat request's final assistant message, if it ends with one."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    last = messages[-1]
    content = last.get("content")
    return content if last.get("role") == "assistant" and isinstance(content, str) else None


def _digest(prompt: str, seed: int) -> bytes:
    salted = prompt if not seed else f"{prompt}/{seed}"
    return hashlib.blake2b(salted.encode(), digest_size=16).digest()


class Completion:
    """One request's deterministic answer, and its encodings.

    A chat request whose last message is the assistant's (a prefill) is answered as the
    request without it would be, minus the text the prefill already holds: `lead` (the rest of
    the token the prefill ends inside) and then the remaining tokens. A prefill the answer does
    not begin with is ignored (the whole answer follows it), as a backend that does not
    continue a final assistant message would do.
    """

    __slots__ = (
        "dialect",
        "id",
        "model",
        "created",
        "tokens",
        "lead",
        "prompt_tokens",
        "finish",
        "include_usage",
    )

    def __init__(self, dialect: Dialect, body: dict[str, Any], count: int, seed: int = 0) -> None:
        self.dialect = dialect
        self.model = body.get("model") or "fake-llm"
        asked = body.get(dialect.prompt_key)
        prefix = prefill_of(body) if dialect is CHAT else None
        answered = asked[:-1] if prefix is not None else asked
        prompt = json.dumps([self.model, asked], sort_keys=True)
        self.id = dialect.id_prefix + _digest(prompt, seed).hex()[:24]
        self.created = int(time.time())
        max_tokens = body.get("max_tokens")
        capped = is_count(max_tokens) and max_tokens < count
        count = max_tokens if capped else count
        digest = _digest(json.dumps([self.model, answered], sort_keys=True), seed)
        self.tokens = random.Random(digest).choices(range(len(VOCAB)), k=count)
        self.lead = ""
        if prefix is not None:
            self.lead = self._continue_after(prefix)
        self.prompt_tokens = max(1, len(prompt) // 4)  # the usual four-characters rule
        self.finish = "length" if capped else "stop"
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True

    def _continue_after(self, prefix: str) -> str:
        """Drop the tokens `prefix` holds; the rest of the one it ends inside (the lead)."""
        if not self.text.startswith(prefix):
            return ""
        held = 0
        for i, token in enumerate(self.tokens):
            word = VOCAB[token]
            if held + len(word) > len(prefix):
                self.tokens = self.tokens[i + 1 :]
                return word[len(prefix) - held :]
            held += len(word)
        self.tokens = []
        return ""

    @property
    def text(self) -> str:
        return self.lead + "".join(VOCAB[i] for i in self.tokens)

    def usage(self) -> dict[str, int]:
        done = len(self.tokens) + bool(self.lead)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
        }

    def message(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        """One chunk as JSON: a WebSocket message, or an SSE event's data."""
        chunk = {
            "id": self.id,
            "object": self.dialect.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return _json(chunk)

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return _sse(self.message(choices, **extra))

    def token_messages(self) -> list[bytes]:
        """The chunk for each vocabulary word: one template split around the token."""
        template = self.message([self.dialect.stream_choice(_MARK, None)])
        head, tail = template.split(_MARK_JSON)
        return [head + word + tail for word in _VOCAB_JSON]

    def token_events(self) -> list[bytes]:
        return [_sse(message) for message in self.token_messages()]

    def content_events(self) -> list[bytes]:
        """One event per content token, the lead (if any) first."""
        events = self.token_events()
        lead = [self.event([self.dialect.stream_choice(self.lead, None)])] if self.lead else []
        return lead + [events[t] for t in self.tokens]

    def opening_message(self) -> bytes | None:
        opening = self.dialect.opening_choice
        return None if opening is None else self.message([opening])

    def opening_event(self) -> bytes | None:
        opening = self.opening_message()
        return None if opening is None else _sse(opening)

    def closing_messages(self) -> list[bytes]:
        """The finish chunk, and the usage chunk when asked for (no `[DONE]`: that is SSE's)."""
        messages = [self.message([self.dialect.stream_choice(None, self.finish)])]
        if self.include_usage:
            messages.append(self.message([], usage=self.usage()))
        return messages

    def closing_events(self) -> list[bytes]:
        return [*(_sse(message) for message in self.closing_messages()), _DONE]

    def unary_body(self) -> bytes:
        body = {
            "id": self.id,
            "object": self.dialect.unary_object,
            "created": self.created,
            "model": self.model,
            "choices": [self.dialect.unary_choice(self.text, self.finish)],
            "usage": self.usage(),
        }
        return _json(body)
