"""`streamgate fake-llm`: flags to knobs, then serve until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .app import build_app
from .generate import STATS
from .knobs import Knobs

# aiohttp waits this long twice (grace, then after cancelling) before dropping open requests;
# its 60 s default would let one stalled stream hold up SIGTERM for two minutes.
_SHUTDOWN_TIMEOUT_S = 0.25


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


def _knobs(args: argparse.Namespace) -> Knobs:
    return Knobs(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Knobs)})


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
    add(
        "--ttft",
        type=_non_negative(float),
        default=0.0,
        metavar="SECONDS",
        help="wait before the first content token (default: 0)",
    )
    add(
        "--tokens-per-s",
        type=_non_negative(float),
        default=0.0,
        metavar="RATE",
        help="content token pace; 0 (the default) sends them as fast as the client reads",
    )
    add(
        "--tokens",
        type=_non_negative(int),
        default=16,
        metavar="N",
        help="content tokens per completion (default: %(default)s)",
    )
    add(
        "--fail-status",
        type=_non_negative(int),
        metavar="STATUS",
        help="answer every completion request with this status and an OpenAI error body",
    )
    add("--error-code", metavar="CODE", help="the error body's code, e.g. context_length_exceeded")
    add(
        "--retry-after",
        type=_non_negative(int),
        metavar="SECONDS",
        help="send Retry-After with --fail-status responses",
    )
    add(
        "--stall-after",
        type=_non_negative(int),
        metavar="N",
        help="after N content tokens stop sending, but keep the connection open",
    )
    add(
        "--reset-after",
        type=_non_negative(int),
        metavar="N",
        help="after N content tokens reset the connection (TCP RST)",
    )
    add(
        "--cut-after",
        type=_non_negative(int),
        metavar="N",
        help="after N content tokens end the body cleanly, with no finish_reason and no [DONE]",
    )
    add(
        "--prefill",
        choices=("continue", "refuse"),
        default="continue",
        help="a chat request ending with an assistant message: continue that text (only the "
        "rest of the answer is sent), or refuse it with a 400 (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=0,
        help="mixed into the token choice: workers with other seeds answer a request "
        "differently (default: %(default)s)",
    )
    return parser


def _non_negative(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse
