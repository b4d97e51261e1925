"""Child processes for the worker pool tests (`python -m tests.support.workers_helpers MODE`).

slow-ready --port N --index I --ready-after-per-index S
    fake-llm that listens at once but answers /health with 503 for its first I * S seconds:
    a worker that is up, yet not ready (a model still loading).
supervise COUNT
    a WorkerSupervisor of COUNT fake-llm workers in a process of its own; prints
    `workers: PID PID ...` once all are ready, then runs until killed. Lets a test SIGKILL
    the process that owns the workers and look for orphans.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from aiohttp import web

from gateway import fake_llm
from gateway.config.model import ReadyConfig, WorkerPoolUpstream
from gateway.observe.metrics import Metrics
from gateway.protocols.http.client import HttpClient
from gateway.upstreams.workers import WorkerSupervisor

FAKE_LLM = (sys.executable, "-m", "gateway", "fake-llm", "--port", "{port}")


async def slow_ready(port: int, ready_after_s: float) -> None:
    ready_at = time.monotonic() + ready_after_s

    @web.middleware
    async def gate(request: web.Request, handler):
        if request.path == "/health" and time.monotonic() < ready_at:
            return web.json_response({"status": "loading"}, status=503)
        return await handler(request)

    app = fake_llm.build_app(fake_llm.Knobs())
    app.middlewares.append(gate)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"slow-ready listening on port {port}, ready in {ready_after_s:g}s", flush=True)
    await _until_terminated()
    await runner.cleanup()


async def supervise(count: int) -> None:
    config = WorkerPoolUpstream(command=FAKE_LLM, count=count, ready=ReadyConfig(timeout=15.0))
    supervisor = WorkerSupervisor("orphans", config, Metrics(), HttpClient)
    await supervisor.start()
    while not all(w.endpoint.healthy for w in supervisor.workers):
        await asyncio.sleep(0.05)
    pids = " ".join(str(w.process.pid) for w in supervisor.workers if w.process)
    print(f"workers: {pids}", flush=True)
    await _until_terminated()
    await supervisor.stop()


async def _until_terminated() -> None:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    modes = parser.add_subparsers(dest="mode", required=True)
    slow = modes.add_parser("slow-ready")
    slow.add_argument("--port", type=int, required=True)
    slow.add_argument("--index", type=int, required=True)
    slow.add_argument("--ready-after-per-index", type=float, required=True)
    sup = modes.add_parser("supervise")
    sup.add_argument("count", type=int)
    args = parser.parse_args()
    if args.mode == "slow-ready":
        asyncio.run(slow_ready(args.port, args.index * args.ready_after_per_index))
    else:
        asyncio.run(supervise(args.count))


if __name__ == "__main__":
    main()
