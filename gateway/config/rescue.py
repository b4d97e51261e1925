"""A route's rescue policies: hedging a slow first token and resuming a stream cut mid-answer
(`routes[].hedge`, `routes[].resume`); the engine's side is `engine/hedge.py` and
`engine/resume.py`."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.units import Bytes, KiB, Seconds


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """Hedging a slow first token: when a try has sent no content for `after`, the next try
    (another endpoint of the same upstream this request has not tried, else the next fallback)
    starts beside it; the first to send content is relayed and every other try is closed at
    once. Headers and a role-only SSE delta are not content. Admission charges the request
    once: a hedge takes no concurrency units or token budget of its own; its extra load is
    bounded by `max_extra`, by `budget_percent`, and by the upstream's `max_connections` (a
    hedge takes one of them like any try). Only a request's own first answer is hedged (not
    a resume)."""

    after: Seconds = 2.0
    """No content this long after a try started: start the next one beside it."""
    max_extra: int = 1
    """Hedges per request at most (tries beside the first)."""
    budget_percent: int = 10
    """Percent (0-100) of the route's requests of the last 10 s that may be hedged, so
    hedging never doubles the load on a struggling backend; at least one hedge per 10 s is
    allowed, so a quiet route can hedge too. 0 never hedges."""


RESUME_CONDITIONS = ("reset", "cut", "chunk_gap_timeout")
"""The breaks after the commit point a resume can be asked for (`resume.on`)."""


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    """Resuming an OpenAI-style chat completion stream (SSE) that breaks after the commit point:
    the gateway keeps the text it has relayed and asks the next try (another endpoint this
    request has not tried, else the next fallback, else the same endpoint again while
    `retry.attempts` allows) to continue it, with the same messages plus
    an assistant message holding that text (how, is the upstream's `prefill`). Only what follows
    is relayed, under the stream's first `id`; `[DONE]` and `usage` come from the upstream that
    finished. A backend that refuses the prefill (400 or 422) is asked again without it, and its
    answer is relayed from where the client's text ends, only if it begins with exactly that
    text; otherwise the stream ends with `event: error` (`resume_diverged`)."""

    on: tuple[str, ...] = RESUME_CONDITIONS
    """What triggers a resume: `reset` (the upstream dropped the connection mid-answer),
    `cut` (the body ended with no `finish_reason` and no `[DONE]`), `chunk_gap_timeout`."""
    max: int = 2
    """Resumes per request at most."""
    max_prefix_bytes: Bytes = 64 * KiB
    """Text kept for a resume (UTF-8 bytes of the deltas' content); a longer answer is not
    resumed (it ends as without `resume`)."""
