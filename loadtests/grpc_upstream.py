"""The gRPC upstream of the gRPC scenario: `python -m loadtests.grpc_upstream --port 0`.

`/bench.Tokens/Stream` takes a JSON request `{"n", "interval_s", "size"}` and sends `n`
messages of `size` bytes, `interval_s` apart (paced like fake-llm's tokens). It notes, on
CLOCK_MONOTONIC, when a call is cancelled; `/bench.Tokens/Stats` answers
`{"cancelled", "last_cancel_monotonic"}` in JSON, as fake-llm's /debug/stats does for a
client gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time

import grpc
from grpc import aio

STREAM, STATS = "/bench.Tokens/Stream", "/bench.Tokens/Stats"


class Tokens:
    def __init__(self) -> None:
        self.cancelled = 0
        self.last_cancel = 0.0

    async def stream(self, raw: bytes, context: aio.ServicerContext) -> None:
        ask = json.loads(raw)
        n, interval, size = ask["n"], ask.get("interval_s", 0.0), ask.get("size", 200)
        pad = b"x" * max(0, size - 16)
        try:
            for i in range(n):
                if i and interval:
                    await asyncio.sleep(interval)
                await context.write(b"tok %09d " % i + pad)
        except asyncio.CancelledError:
            self.last_cancel = time.monotonic()
            self.cancelled += 1
            raise

    async def stats(self, raw: bytes, context: aio.ServicerContext) -> bytes:
        answer = {"cancelled": self.cancelled, "last_cancel_monotonic": self.last_cancel}
        return json.dumps(answer).encode()


async def serve(port: int) -> None:
    server = aio.server()
    tokens = Tokens()
    handlers = {
        "Stream": grpc.unary_stream_rpc_method_handler(tokens.stream),
        "Stats": grpc.unary_unary_rpc_method_handler(tokens.stats),
    }
    generic = grpc.method_handlers_generic_handler("bench.Tokens", handlers)
    server.add_generic_rpc_handlers((generic,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    # `http://` only so the bench's announcement pattern reads it; the port speaks gRPC.
    print(f"grpc bench upstream listening on http://127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
