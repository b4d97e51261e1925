"""The completion endpoints: parse the request, then fail, stream or answer, as the knobs say.

`write_tokens` is the hot loop: one pre-encoded event per content token, each its own HTTP
chunk, with no per-chunk logging or bookkeeping.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import faults
from .completion import CHAT, TEXT, Completion, Dialect, prefill_of
from .knobs import Knobs
from .stats import Stats

KNOBS = web.AppKey("knobs", Knobs)
STATS = web.AppKey("stats", Stats)

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_YIELD_EVERY = 16  # unpaced streams yield to the loop this often, so streams interleave


async def chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, CHAT)


async def text(request: web.Request) -> web.StreamResponse:
    return await _complete(request, TEXT)


async def _complete(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    """Parse, then fail, stream or answer at once, as the knobs say."""
    stats = request.app[STATS]
    try:
        body, knobs = parse_request(await request.read(), request.app[KNOBS])
    except ValueError as exc:  # json.JSONDecodeError included
        return faults.error_response(400, f"invalid request: {exc}")
    stats.completions_started += 1
    if knobs.fail_status:
        stats.failures_injected += 1
        return faults.injected_failure(knobs)
    if knobs.prefill == "refuse" and dialect is CHAT and prefill_of(body) is not None:
        stats.failures_injected += 1
        return faults.prefill_refused()
    completion = Completion(dialect, body, knobs.tokens, knobs.seed)
    respond = _stream if body.get("stream") is True else _unary
    stats.completions_active += 1
    try:
        return await respond(request, completion, knobs, stats)
    except asyncio.CancelledError:  # handler_cancellation: the client closed the connection
        stats.note_client_gone()
        raise
    finally:
        stats.completions_active -= 1


def parse_request(data: bytes | str, knobs: Knobs) -> tuple[dict[str, Any], Knobs]:
    """A request's JSON object and its knobs (the `"fake"` overrides applied); ValueError
    says what is wrong with it."""
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    return body, knobs.override(body.get("fake"))


async def _stream(
    request: web.Request, completion: Completion, knobs: Knobs, stats: Stats
) -> web.StreamResponse:
    events = completion.content_events()
    limit, fault = knobs.fault_point(len(events))
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    try:
        opening = completion.opening_event()
        if opening is not None:
            await response.write(opening)  # leaves with the headers, before the ttft wait
        await write_tokens(response.write, events[:limit], knobs)
        if fault is not None:
            return await faults.inject(fault, request, response, stats)
        for event in completion.closing_events():
            await response.write(event)
        await response.write_eof()
    except ConnectionResetError:  # a write found the client gone before the cancellation did
        stats.note_client_gone()
        return response
    stats.streams_completed += 1
    return response


async def write_tokens(
    write: Callable[[bytes], Awaitable[Any]], events: list[bytes], knobs: Knobs
) -> None:
    """The hot loop: after `ttft`, one write per content token (an HTTP chunk, or a WebSocket
    message), paced by `tokens_per_s`."""
    if knobs.ttft:
        await asyncio.sleep(knobs.ttft)
    if not knobs.tokens_per_s:
        for i, event in enumerate(events):
            if not i % _YIELD_EVERY:
                await asyncio.sleep(0)
            await write(event)
        return
    loop = asyncio.get_running_loop()
    start, interval = loop.time(), 1 / knobs.tokens_per_s
    for i, event in enumerate(events):
        delay = start + i * interval - loop.time()  # a schedule, so sleep overshoot never adds up
        if delay > 0:
            await asyncio.sleep(delay)
        await write(event)


async def _unary(
    request: web.Request, completion: Completion, knobs: Knobs, stats: Stats
) -> web.StreamResponse:
    limit, fault = knobs.fault_point(len(completion.tokens) + bool(completion.lead))
    generating_s = knobs.ttft + (limit / knobs.tokens_per_s if knobs.tokens_per_s else 0.0)
    if generating_s:
        await asyncio.sleep(generating_s)
    body = completion.unary_body()
    if fault is None:
        stats.unary_completed += 1
        return web.Response(body=body, content_type="application/json")
    response = None
    if limit:  # a truncated body: headers and half of it, then the fault
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        try:
            await response.write(body[: len(body) // 2])
        except ConnectionResetError:
            stats.note_client_gone()
            return response
    return await faults.inject(fault, request, response, stats)
