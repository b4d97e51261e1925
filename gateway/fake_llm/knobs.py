"""The knobs: how a completion is generated and how it fails, and a request's overrides."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True, slots=True)
class Knobs:
    """How a completion is generated and how it fails; flags set them, `"fake"` overrides."""

    ttft: float = 0.0  # seconds before the first content token
    tokens_per_s: float = 0.0  # content token pace; 0 = as fast as the socket takes them
    tokens: int = 16  # content tokens per completion
    fail_status: int | None = None  # answer with this status and an OpenAI error body
    error_code: str | None = None  # the error body's `code`, e.g. context_length_exceeded
    retry_after: int | None = None  # seconds, sent as `Retry-After` with a failure
    stall_after: int | None = None  # content tokens, then silence until the client leaves
    reset_after: int | None = None  # content tokens, then a TCP RST
    cut_after: int | None = None  # content tokens, then a clean end: no finish, no [DONE]
    prefill: str = "continue"  # a final assistant message: "continue" it, or "refuse" (400)
    seed: int = 0  # mixed into the token choice: another seed, another answer to one request

    def override(self, fake: Any) -> Knobs:
        """These knobs with a request's `"fake"` object applied; ValueError names a bad key."""
        if fake is None:
            return self
        if not isinstance(fake, dict):
            raise ValueError("'fake' must be an object")
        for key, value in fake.items():
            check = _OVERRIDES.get(key)
            if check is None:
                raise ValueError(f"unknown 'fake' key {key!r}; known: {', '.join(_OVERRIDES)}")
            if not check(value):
                raise ValueError(f"'fake.{key}': {check.__doc__}, got {value!r}")
        return dataclasses.replace(self, **fake)

    def fault_point(self, tokens: int) -> tuple[int, str | None]:
        """How many content tokens go out, then which fault (if any) is injected."""
        limit, fault = tokens, None
        if self.stall_after is not None and self.stall_after < limit:
            limit, fault = self.stall_after, "stall"
        if self.reset_after is not None and self.reset_after < limit:
            limit, fault = self.reset_after, "reset"
        if self.cut_after is not None and self.cut_after < limit:
            limit, fault = self.cut_after, "cut"
        return limit, fault


PREFILL_MODES = ("continue", "refuse")
"""How a request whose last message is the assistant's (a prefill) is taken: "continue"
streams only the rest of the answer it begins; "refuse" answers 400, as many backends do."""

# Each check's docstring is the "expected ..." half of its error message.


def is_count(v: Any) -> bool:
    """expected an integer >= 0"""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_seconds(v: Any) -> bool:
    """expected a number >= 0"""
    return isinstance(v, int | float) and not isinstance(v, bool) and v >= 0


def _is_optional_count(v: Any) -> bool:
    """expected an integer >= 0 or null"""
    return v is None or is_count(v)


def _is_prefill(v: Any) -> bool:
    """expected 'continue' or 'refuse'"""
    return v in PREFILL_MODES


def _is_int(v: Any) -> bool:
    """expected an integer"""
    return isinstance(v, int) and not isinstance(v, bool)


def _is_optional_str(v: Any) -> bool:
    """expected a string or null"""
    return v is None or isinstance(v, str)


_OVERRIDES: dict[str, Callable[[Any], bool]] = {
    "ttft": _is_seconds,
    "tokens_per_s": _is_seconds,
    "tokens": is_count,
    "fail_status": _is_optional_count,
    "error_code": _is_optional_str,
    "retry_after": _is_optional_count,
    "stall_after": _is_optional_count,
    "reset_after": _is_optional_count,
    "cut_after": _is_optional_count,
    "prefill": _is_prefill,
    "seed": _is_int,
}
