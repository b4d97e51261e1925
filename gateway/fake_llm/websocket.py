"""The Inferneo-style WebSocket endpoints: `ws://host/v1/chat/completions` (and
`/v1/completions`).

The client sends one JSON request per text message; the answer is the completion's chunks, one
per message (for chat the role-only delta, then one chunk per content token, then the chunk
whose `finish_reason` is set, and the usage chunk when `stream_options.include_usage` asks),
with no `[DONE]`: the finish chunk ends it. The session then waits for the next request;
requests sent while one is answered are answered in turn. The knobs are the SSE endpoint's:
- `fail_status`: from the flags, the upgrade itself is refused with that status and an OpenAI
  error body; from a request's `"fake"`, the answer is one `{"error": {...}}` message and a
  close, 1011 for a 5xx and 1008 otherwise.
- `ttft`, `tokens_per_s`, `tokens`, `max_tokens`: as for SSE.
- `stall_after` / `reset_after`: that many content tokens, then silence until the client
  leaves, or a TCP RST.
A client that closes or drops the session in the middle of an answer is counted as gone
(`/debug/stats`), at once: the session reads while it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import WSCloseCode, WSMsgType, web

from . import faults
from .completion import CHAT, TEXT, Completion, Dialect
from .generate import KNOBS, STATS, parse_request, write_tokens
from .knobs import Knobs
from .stats import Stats

_MAX_MESSAGE = 64 * 2**20  # as the HTTP endpoints' client_max_size


async def chat(request: web.Request) -> web.StreamResponse:
    return await _session(request, CHAT)


async def text(request: web.Request) -> web.StreamResponse:
    return await _session(request, TEXT)


async def _session(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    knobs, stats = request.app[KNOBS], request.app[STATS]
    ws = web.WebSocketResponse(max_msg_size=_MAX_MESSAGE)
    if not ws.can_prepare(request).ok:
        message = f"{request.path} takes a POST, or a GET that upgrades to a WebSocket"
        return faults.error_response(405, message)
    if knobs.fail_status:
        stats.failures_injected += 1
        return faults.injected_failure(knobs)
    await ws.prepare(request)
    stats.ws_sessions += 1
    requests: asyncio.Queue[str | bytes] = asyncio.Queue()
    answering = asyncio.create_task(_answer_in_turn(ws, request, dialect, requests))
    try:
        async for msg in ws:  # read while answering, so a close is seen at once
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                requests.put_nowait(msg.data)
    finally:  # a close, a lost connection, or the handler cancelled
        if stats.completions_active and not answering.done():
            stats.note_client_gone()
        answering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answering
    return ws


async def _answer_in_turn(
    ws: web.WebSocketResponse, request: web.Request, dialect: Dialect, requests: asyncio.Queue
) -> None:
    stats = request.app[STATS]
    while True:
        data = await requests.get()
        try:
            body, knobs = parse_request(data, request.app[KNOBS])
        except ValueError as exc:
            await _fail(ws, 400, f"invalid request: {exc}")
            return
        stats.completions_started += 1
        if knobs.fail_status:
            stats.failures_injected += 1
            await _fail(ws, knobs.fail_status, "fake-llm: injected failure", knobs.error_code)
            return
        stats.completions_active += 1
        try:
            await _answer(ws, request, Completion(dialect, body, knobs.tokens), knobs, stats)
        except ConnectionResetError:  # a send found the client gone before the reader did
            return
        finally:
            stats.completions_active -= 1


async def _answer(
    ws: web.WebSocketResponse,
    request: web.Request,
    completion: Completion,
    knobs: Knobs,
    stats: Stats,
) -> None:
    limit, fault = knobs.fault_point(len(completion.tokens))
    messages = completion.token_messages()

    async def send(message: bytes) -> None:
        await ws.send_frame(message, WSMsgType.TEXT)

    opening = completion.opening_message()
    if opening is not None:
        await send(opening)  # at once, before the ttft wait
    await write_tokens(send, [messages[t] for t in completion.tokens[:limit]], knobs)
    if fault is not None:
        await faults.inject(fault, request, None, stats)  # a stall never returns
        return
    for message in completion.closing_messages():
        await send(message)
    stats.streams_completed += 1


async def _fail(ws: web.WebSocketResponse, status: int, message: str, code=None) -> None:
    body = json.loads(faults.error_response(status, message, code=code).body)
    await ws.send_str(json.dumps(body))
    close = WSCloseCode.INTERNAL_ERROR if status >= 500 else WSCloseCode.POLICY_VIOLATION
    await ws.close(code=close, message=f"status {status}".encode())
