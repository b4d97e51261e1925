"""`streamgate fake-llm`: the bundled reference worker.

An OpenAI-compatible server that streams deterministic tokens at a configurable pace and
fails on demand, so that the gateway's timeouts, retries, commit point and disconnect
handling can be driven for real: by the demo, the worker-pool example, tests and load tests.

Behaviour worth knowing when writing tests against it:

- The token text depends only on the request's `model` and `messages` (or `prompt`); the
  first k tokens are the same whatever the token count, stream flag or knobs.
- Chat streams send the role-only delta at once, together with the headers; `ttft` is the
  wait before the first *content* token. `/v1/completions` streams have no such preamble.
- `stall_after N` / `reset_after N` count content tokens: N tokens, then silence until the
  client leaves, or a TCP RST. N == 0 fails before the first content token; N >= tokens never
  fires. For unary requests N == 0 fails before any byte is sent, N > 0 after the headers and
  half of the body (a truncated body, as a crashed backend would leave it).
- `fail_status` answers at once, with an OpenAI-style error body and `Retry-After` when asked.
- A request's JSON may override every knob: `"fake": {"ttft": 0.5, "tokens": 20, ...}`.
- `max_tokens` caps the token count (finish_reason `length`), as a real backend does.

Built for load tests: every byte of an event except the token is encoded once per request,
and each event goes out as its own HTTP chunk, with no per-chunk logging or bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web


def _json(value: Any) -> bytes:
    # Compact UTF-8, as real backends send it (not \\u escapes).
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


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
_VOCAB_JSON = tuple(_json(w) for w in VOCAB)
_MARK = "\x00token\x00"
_MARK_JSON = json.dumps(_MARK).encode()
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_YIELD_EVERY = 16  # unpaced streams yield to the loop this often, so streams interleave
_RESET_FLUSH_BOUND_S = 1.0
# aiohttp waits this long twice (grace, then after cancelling) before dropping open requests;
# its 60 s default would let one stalled stream hold up SIGTERM for two minutes.
_SHUTDOWN_TIMEOUT_S = 0.25
_SIOCOUTQNSD = 0x894B  # Linux: bytes in the socket's send queue not yet sent
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 429: "rate_limit_error",
}


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
        return limit, fault


def _count(v: Any) -> bool:
    """expected an integer >= 0"""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _seconds(v: Any) -> bool:
    """expected a number >= 0"""
    return isinstance(v, int | float) and not isinstance(v, bool) and v >= 0


def _optional_count(v: Any) -> bool:
    """expected an integer >= 0 or null"""
    return v is None or _count(v)


def _optional_str(v: Any) -> bool:
    """expected a string or null"""
    return v is None or isinstance(v, str)


_OVERRIDES: dict[str, Callable[[Any], bool]] = {
    "ttft": _seconds, "tokens_per_s": _seconds, "tokens": _count,
    "fail_status": _optional_count, "error_code": _optional_str, "retry_after": _optional_count,
    "stall_after": _optional_count, "reset_after": _optional_count,
}


class Stats:
    """Counters behind `/debug/stats`; tests read them to see what the gateway did upstream."""

    __slots__ = (
        "requests", "completions_started", "completions_active", "streams_completed",
        "unary_completed", "client_gone", "client_gone_monotonic", "failures_injected",
        "stalls_injected", "resets_injected", "open_connections",
    )

    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.completions_started = 0
        self.completions_active = 0
        self.streams_completed = 0
        self.unary_completed = 0
        self.client_gone = 0  # completions whose client left before the response was complete
        # time.monotonic() is CLOCK_MONOTONIC, system-wide on Linux: comparable across processes
        self.client_gone_monotonic: collections.deque[float] = collections.deque(maxlen=100)
        self.failures_injected = 0
        self.stalls_injected = 0
        self.resets_injected = 0
        self.open_connections: Callable[[], int] | None = None  # set by whoever runs the app

    def note_client_gone(self) -> None:
        self.client_gone += 1
        self.client_gone_monotonic.append(time.monotonic())

    def snapshot(self) -> dict[str, Any]:
        counters = {name: getattr(self, name) for name in self.__slots__}
        counters["requests"] = dict(self.requests)
        gone = list(self.client_gone_monotonic)
        counters["client_gone_monotonic"] = gone
        counters["last_client_gone_monotonic"] = gone[-1] if gone else None
        counters["open_connections"] = self.open_connections() if self.open_connections else None
        return counters


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
    "chatcmpl-", "messages", "chat.completion", "chat.completion.chunk",
    stream_choice=lambda token, finish: {
        "index": 0, "delta": {} if token is None else {"content": token},
        "logprobs": None, "finish_reason": finish,
    },
    unary_choice=lambda text, finish: {
        "index": 0, "message": {"role": "assistant", "content": text},
        "logprobs": None, "finish_reason": finish,
    },
    opening_choice={
        "index": 0, "delta": {"role": "assistant", "content": ""},
        "logprobs": None, "finish_reason": None,
    },
)
TEXT = Dialect(
    "cmpl-", "prompt", "text_completion", "text_completion",
    stream_choice=lambda token, finish: {
        "text": token or "", "index": 0, "logprobs": None, "finish_reason": finish,
    },
    unary_choice=lambda text, finish: {
        "text": text, "index": 0, "logprobs": None, "finish_reason": finish,
    },
    opening_choice=None,
)


class Completion:
    """One request's deterministic answer, and its encodings."""

    __slots__ = ("dialect", "id", "model", "created", "tokens", "prompt_tokens", "finish",
                 "include_usage")

    def __init__(self, dialect: Dialect, body: dict[str, Any], count: int) -> None:
        self.dialect = dialect
        self.model = body.get("model") or "fake-llm"
        prompt = json.dumps([self.model, body.get(dialect.prompt_key)], sort_keys=True)
        digest = hashlib.blake2b(prompt.encode(), digest_size=16).digest()
        self.id = dialect.id_prefix + digest.hex()[:24]
        self.created = int(time.time())
        max_tokens = body.get("max_tokens")
        capped = _count(max_tokens) and max_tokens < count
        count = max_tokens if capped else count
        self.tokens = random.Random(digest).choices(range(len(VOCAB)), k=count)
        self.prompt_tokens = max(1, len(prompt) // 4)  # the usual four-characters rule
        self.finish = "length" if capped else "stop"
        options = body.get("stream_options")
        self.include_usage = isinstance(options, dict) and options.get("include_usage") is True

    @property
    def text(self) -> str:
        return "".join(VOCAB[i] for i in self.tokens)

    def usage(self) -> dict[str, int]:
        done = len(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": self.id, "object": self.dialect.chunk_object, "created": self.created,
                 "model": self.model, "choices": choices, **extra}
        return b"data: " + _json(chunk) + b"\n\n"

    def token_events(self) -> list[bytes]:
        """The event for each vocabulary word: one template split around the token."""
        template = self.event([self.dialect.stream_choice(_MARK, None)])
        head, tail = template.split(_MARK_JSON)
        return [head + word + tail for word in _VOCAB_JSON]

    def opening_event(self) -> bytes | None:
        opening = self.dialect.opening_choice
        return None if opening is None else self.event([opening])

    def closing_events(self) -> list[bytes]:
        events = [self.event([self.dialect.stream_choice(None, self.finish)])]
        if self.include_usage:
            events.append(self.event([], usage=self.usage()))
        events.append(_DONE)
        return events

    def unary_body(self) -> bytes:
        body = {"id": self.id, "object": self.dialect.unary_object, "created": self.created,
                "model": self.model, "choices": [self.dialect.unary_choice(self.text, self.finish)],
                "usage": self.usage()}
        return _json(body)


KNOBS = web.AppKey("knobs", Knobs)
MODEL = web.AppKey("model", str)
STATS = web.AppKey("stats", Stats)


def build_app(knobs: Knobs, model: str = "fake-llm") -> web.Application:
    """The fake-llm application; run it with `handler_cancellation=True` (see `serve`)."""
    app = web.Application(middlewares=[_count_requests], client_max_size=64 * 2**20)
    app[KNOBS] = knobs
    app[MODEL] = model
    app[STATS] = Stats()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _text)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/debug/env", _env)
    app.router.add_get("/debug/stats", _stats)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


@web.middleware
async def _count_requests(request: web.Request, handler: Any) -> web.StreamResponse:
    request.app[STATS].requests[request.path] += 1
    return await handler(request)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _complete(request, CHAT)


async def _text(request: web.Request) -> web.StreamResponse:
    return await _complete(request, TEXT)


async def _complete(request: web.Request, dialect: Dialect) -> web.StreamResponse:
    """Parse, then fail, stream or answer at once, as the knobs say."""
    stats = request.app[STATS]
    try:
        body = json.loads(await request.read())
        if not isinstance(body, dict):
            raise ValueError("request body must be a JSON object")
        knobs = request.app[KNOBS].override(body.get("fake"))
    except ValueError as exc:  # json.JSONDecodeError included
        return error_response(400, f"invalid request: {exc}")
    stats.completions_started += 1
    if knobs.fail_status:
        stats.failures_injected += 1
        return _injected_failure(knobs)
    completion = Completion(dialect, body, knobs.tokens)
    respond = _stream if body.get("stream") is True else _unary
    stats.completions_active += 1
    try:
        return await respond(request, completion, knobs, stats)
    except asyncio.CancelledError:  # handler_cancellation: the client closed the connection
        stats.note_client_gone()
        raise
    finally:
        stats.completions_active -= 1


async def _stream(
    request: web.Request, completion: Completion, knobs: Knobs, stats: Stats
) -> web.StreamResponse:
    limit, fault = knobs.fault_point(len(completion.tokens))
    events = completion.token_events()
    response = web.StreamResponse(headers=_SSE_HEADERS)
    await response.prepare(request)
    try:
        opening = completion.opening_event()
        if opening is not None:
            await response.write(opening)  # leaves with the headers, before the ttft wait
        await _write_tokens(response, [events[t] for t in completion.tokens[:limit]], knobs)
        if fault is not None:
            return await _inject(fault, request, response, stats)
        for event in completion.closing_events():
            await response.write(event)
        await response.write_eof()
    except ConnectionResetError:  # a write found the client gone before the cancellation did
        stats.note_client_gone()
        return response
    stats.streams_completed += 1
    return response


async def _write_tokens(response: web.StreamResponse, events: list[bytes], knobs: Knobs) -> None:
    """The hot loop: after `ttft`, one write per content token, paced by `tokens_per_s`."""
    if knobs.ttft:
        await asyncio.sleep(knobs.ttft)
    if not knobs.tokens_per_s:
        for i, event in enumerate(events):
            if not i % _YIELD_EVERY:
                await asyncio.sleep(0)
            await response.write(event)
        return
    loop = asyncio.get_running_loop()
    start, interval = loop.time(), 1 / knobs.tokens_per_s
    for i, event in enumerate(events):
        delay = start + i * interval - loop.time()  # a schedule, so sleep overshoot never adds up
        if delay > 0:
            await asyncio.sleep(delay)
        await response.write(event)


async def _unary(
    request: web.Request, completion: Completion, knobs: Knobs, stats: Stats
) -> web.StreamResponse:
    limit, fault = knobs.fault_point(len(completion.tokens))
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
    return await _inject(fault, request, response, stats)


async def _inject(
    fault: str, request: web.Request, response: web.StreamResponse | None, stats: Stats
) -> web.StreamResponse:
    if fault == "stall":
        stats.stalls_injected += 1
        await asyncio.Future()  # until the client leaves and the handler is cancelled
    stats.resets_injected += 1
    transport = request.transport
    if transport is not None:
        await _sent(transport)
        sock = transport.get_extra_info("socket")
        # SO_LINGER (on, 0 s): close() sends an RST instead of a FIN, as a crashed backend would
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp's final write_eof meets the closed transport and gives up quietly
    return response or web.Response()


async def _sent(transport: asyncio.Transport) -> None:
    """Wait, bounded, until every byte written has left this host: an RST discards the unsent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _RESET_FLUSH_BOUND_S
    fd = transport.get_extra_info("socket").fileno()
    while loop.time() < deadline:
        if not transport.get_write_buffer_size() and not _unsent_bytes(fd):
            return
        await asyncio.sleep(0.001)


def _unsent_bytes(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except OSError:  # not Linux: the transport buffer is all we can see
        return 0


def _injected_failure(knobs: Knobs) -> web.Response:
    headers = {} if knobs.retry_after is None else {"Retry-After": str(knobs.retry_after)}
    status = knobs.fail_status or 500
    message = f"fake-llm: injected failure (status {status})"
    return error_response(status, message, code=knobs.error_code, headers=headers)


def error_response(
    status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": None, "code": code}
    return web.json_response({"error": error}, status=status, headers=headers)


async def _models(request: web.Request) -> web.Response:
    model = {"id": request.app[MODEL], "object": "model", "created": 0, "owned_by": "streamgate"}
    return web.json_response({"object": "list", "data": [model]})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _env(request: web.Request) -> web.Response:
    env = {k: v for k, v in os.environ.items()
           if k == "CUDA_VISIBLE_DEVICES" or k.startswith("FAKE_LLM_")}
    return web.json_response({"pid": os.getpid(), "argv": sys.argv, "env": env})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].snapshot())


async def _not_found(request: web.Request) -> web.Response:
    return error_response(404, f"no such endpoint: {request.method} {request.path}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamgate fake-llm",
        description="OpenAI-compatible fake LLM worker: deterministic tokens, "
        "configurable pace and failures. A request's JSON may override any knob "
        'per call: "fake": {"ttft": 0.5, "tokens": 20, "fail_status": 503, ...}.',
    )
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    add("--port", type=_non_negative(int), default=8000, help="0 picks a free port")
    add("--model", default="fake-llm", help="name listed by /v1/models (default: %(default)s)")
    add("--ttft", type=_non_negative(float), default=0.0, metavar="SECONDS",
        help="wait before the first content token (default: 0)")
    add("--tokens-per-s", type=_non_negative(float), default=0.0, metavar="RATE",
        help="content token pace; 0 (the default) sends them as fast as the client reads")
    add("--tokens", type=_non_negative(int), default=16, metavar="N",
        help="content tokens per completion (default: %(default)s)")
    add("--fail-status", type=_non_negative(int), metavar="STATUS",
        help="answer every completion request with this status and an OpenAI error body")
    add("--error-code", metavar="CODE", help="the error body's code, e.g. context_length_exceeded")
    add("--retry-after", type=_non_negative(int), metavar="SECONDS",
        help="send Retry-After with --fail-status responses")
    add("--stall-after", type=_non_negative(int), metavar="N",
        help="after N content tokens stop sending, but keep the connection open")
    add("--reset-after", type=_non_negative(int), metavar="N",
        help="after N content tokens reset the connection (TCP RST)")
    return parser


def _non_negative(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _knobs(args: argparse.Namespace) -> Knobs:
    return Knobs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Knobs)})


async def serve(args: argparse.Namespace) -> int:
    """Listen, announce the URL on stdout, serve until SIGINT or SIGTERM."""
    app = build_app(_knobs(args), args.model)
    # handler_cancellation: a client that leaves cancels its handler (AppRunner's default is
    # to let it run on), which is what stops generation and what /debug/stats counts.
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    server = runner.server
    assert server is not None
    app[STATS].open_connections = lambda: len(server.connections)
    try:
        await web.TCPSite(runner, args.host, args.port, backlog=1024).start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"fake-llm listening on http://{host}:{runner.addresses[0][1]}", flush=True)
        await stopping.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import uvloop
    except ImportError:
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(serve(args))
    except OSError as exc:  # e.g. the port is taken
        print(f"fake-llm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
