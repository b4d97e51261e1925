"""Resuming a chat completion stream that broke after the commit point (route `resume:`).

Only for an OpenAI-style chat completion streamed over SSE (a JSON body with `messages`, one
choice), and only when the break is one the route lists: `reset` (the upstream dropped the
connection), `cut` (the body ended with no `finish_reason` and no `[DONE]`) or
`chunk_gap_timeout`. The relay keeps the text it relayed (`Transcript`); on a break it closes
the broken upstream request and asks the attempt loop for the next try (another endpoint this
request has not tried, else the next fallback, else the same endpoint while `retry.attempts`
allows; retried there as `retry:` says, never hedged):

- with the upstream's `prefill: assistant` or `vllm`, the same request plus an assistant
  message holding the text (and, for `vllm`, `continue_final_message: true` and
  `add_generation_prompt: false`): the backend continues it;
- with `prefill: none`, or when the backend refuses the prefill (400 or 422), the request as
  the client sent it: the new answer is spliced on only past the text already sent
  (`Continuation`), and only if it begins with exactly that text.

The continuation's first content is its commit point like any try's, bounded by
`timeouts.first_chunk`; the stream clock is paused meanwhile. What the client then reads is
rewritten by `Continuation`. `usage` and `[DONE]` are the finishing upstream's own: after a
prefill its `prompt_tokens` include the resent text and `completion_tokens` count the
continuation only; after a splice they count the whole answer it generated again.
"""

from __future__ import annotations

import json

from gateway.config.routes import Route
from gateway.engine.attempts import Attempts
from gateway.engine.commit import AttemptFailed
from gateway.engine.context import RequestContext
from gateway.engine.continuation import Continuation
from gateway.engine.exchange import Opened
from gateway.engine.framing import Framing, choose
from gateway.engine.order import Try
from gateway.engine.sse import LF_SEPARATOR
from gateway.engine.transcript import Transcript
from gateway.observe.metrics import Metrics

REFUSED = (400, 422)
"""Statuses by which a backend refuses a prefill; it is then asked without one."""


class Resumer:
    """One committed stream's resumes: what was relayed, and how to continue it."""

    __slots__ = (
        "ctx", "route", "tries", "metrics", "transcript", "continuation", "framing", "count",
    )

    def __init__(
        self,
        ctx: RequestContext,
        route: Route,
        tries: Attempts,
        metrics: Metrics,
        framing: Framing,
    ) -> None:
        self.ctx, self.route, self.tries, self.metrics = ctx, route, tries, metrics
        self.transcript = Transcript(route.resume.max_prefix_bytes)
        self.continuation: Continuation | None = None
        self.framing = framing
        """The client stream's framing: its event separator is the one the client reads."""
        self.count = 0

    @classmethod
    def start(
        cls, ctx: RequestContext, route: Route, opened: Opened, tries: Attempts | None,
        metrics: Metrics,
    ) -> Resumer | None:
        """A resumer for this stream, or None where resuming does not apply."""
        if route.resume is None or tries is None or not _is_chat(ctx.json):
            return None
        framing = opened.framing
        if opened.status != 200 or framing is None or framing.name != "sse":
            return None
        return cls(ctx, route, tries, metrics, framing)

    def watch(self, events: bytes) -> bytes:
        """Whole events about to be relayed: noted, and a continuation's rewritten."""
        if self.continuation is not None:
            return self.continuation.rewrite(events)
        self.transcript.feed(events, self.framing.sep)
        return events

    def can_resume(self, condition: str) -> bool:
        """A listed break of an answer not finished yet (a body that ends before its
        finish_reason or [DONE] is `cut`), within the bounds."""
        policy = self.route.resume
        return (
            condition in policy.on and self.count < policy.max and self.transcript.resumable
        )

    async def resume(self, condition: str, broken: Opened) -> Opened | None:
        """The continuation to relay next, or None when no try could give one."""
        self.count += 1
        if broken.tried is not None:  # the request that broke, in the access log and trace
            broken.tried.result = condition
            outcome = "timeout" if condition == "chunk_gap_timeout" else "upstream_error"
            broken.tried.span.failed(outcome, condition)
        self.ctx.trace.resume(condition)
        ask = _Resume(self.ctx, self.route, self.transcript.text, condition)
        opened = await self.tries.resume(ask)
        if opened is not None and (opened.framing is None or opened.framing.name != "sse"):
            opened.finish(clean=False)
            opened = None
        result = "failed" if opened is None else "spliced" if ask.spliced else "continued"
        rescue = self.metrics.rescue
        self.metrics.child(rescue.resumes, self.route.name, condition, result).inc()
        if opened is not None:
            self.ctx.resumes += 1
            skip = self.transcript.text if ask.spliced else ""
            sep = self.framing.sep or LF_SEPARATOR
            self.continuation = Continuation(self.transcript, skip, opened.framing, sep)
        return opened


class _Resume:
    """The attempt loop's ask for a continuation (see the module's docstring)."""

    hedged = False
    why = "resume"

    def __init__(self, ctx: RequestContext, route: Route, text: str, reason: str) -> None:
        self.ctx, self.route, self.text, self.reason = ctx, route, text, reason
        self.spliced = False

    async def attempt(self, attempts: Attempts, t: Try) -> Opened:
        self.spliced = False
        dialect = t.pool.config.prefill
        if dialect != "none":
            body = prefill_body(self.ctx.json, self.text, dialect, t.model)
            try:
                return await self._send(attempts, t, body)
            except AttemptFailed as failed:
                if failed.held is None or failed.held.status not in REFUSED:
                    raise
            t = t.again("splice", "prefill_refused")
        self.spliced = True
        return await self._send(attempts, t, attempts.body_for(t))

    async def _send(self, attempts: Attempts, t: Try, body: bytes) -> Opened:
        try:
            return await attempts.send(t, body)
        except AttemptFailed as failed:
            held = failed.held
            if failed.reason != "empty_body" or held is None:
                raise
        # Nothing more to say (a finish, usage, [DONE]): the answer was whole but for those.
        opened = held.opened()
        opened.framing = choose(self.route.framing, held.headers, stream=True)
        return opened


def prefill_body(request: dict, text: str, dialect: str, model: str | None) -> bytes:
    """The request with `text` as the start of the assistant's answer."""
    messages = list(request["messages"])
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "assistant" and (
        isinstance(last.get("content"), str)
    ):  # the client's own prefill, carried on
        messages[-1] = {**last, "content": last["content"] + text}
    else:
        messages.append({"role": "assistant", "content": text})
    body = {**request, "messages": messages}
    if model is not None:
        body["model"] = model
    if dialect == "vllm":
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return json.dumps(body).encode()


def _is_chat(request: dict | None) -> bool:
    if not isinstance(request, dict):
        return False
    messages = request.get("messages")
    return isinstance(messages, list) and bool(messages) and request.get("n", 1) == 1
