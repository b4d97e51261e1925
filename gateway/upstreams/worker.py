"""One slot of a worker pool, and how its command line and port are made."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Collection

from gateway.config.model import WorkerPoolUpstream
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.worker_process import WorkerProcess

SELF_COMMAND = "streamgate"
"""A command starting with this word runs this very gateway's code and interpreter
(`python -m gateway ...`), so the bundled fake-llm works from a virtualenv not on PATH."""

STARTING, READY, FAILING, BACKOFF, STOPPED = "starting", "ready", "failing", "backoff", "stopped"


class Worker:
    """One slot of the pool: its index, GPU, port and endpoint stay; its process is replaced
    at every restart."""

    __slots__ = (
        "label",
        "index",
        "gpu",
        "port",
        "endpoint",
        "process",
        "state",
        "since",
        "ready_at",
        "failures",
        "last_failure",
        "probe_failures",
        "next_try_at",
    )

    def __init__(self, label: str, index: int, gpu: str | None, port: int, url: str) -> None:
        self.label = label
        """`pool[index]`: names the worker in logs and status lines."""
        self.index = index
        self.gpu = gpu
        self.port = port
        self.endpoint = Endpoint(url, healthy=False)
        self.process: WorkerProcess | None = None
        self.state = STARTING
        self.since = time.monotonic()
        """When the current state began."""
        self.ready_at: float | None = None
        """When the current process joined rotation (None: it has not)."""
        self.failures = 0
        """Failures in a row: crashes, readiness timeouts, failed liveness."""
        self.last_failure = ""
        self.probe_failures = 0
        self.next_try_at = 0.0

    def enter(self, state: str) -> None:
        self.state, self.since = state, time.monotonic()


def substitute(text: str, worker: Worker) -> str:
    # Plain replacement, not str.format: arguments may hold JSON with braces of their own.
    return (
        text.replace("{port}", str(worker.port))
        .replace("{gpu}", worker.gpu if worker.gpu is not None else "")
        .replace("{index}", str(worker.index))
    )


def choose_port(
    config: WorkerPoolUpstream, index: int, current: int | None, taken: Collection[int]
) -> int:
    """`port_base + index` when configured; else the worker's port so far while it is free
    (a stable URL across restarts), or a fresh free one."""
    if config.port_base is not None:
        return config.port_base + index
    if current is not None and bind(config.host, current) is not None:
        return current
    while True:
        port = bind(config.host, 0)
        if port is None:
            raise OSError(f"cannot bind a port on {config.host}")
        if port not in taken:
            return port


def bind(host: str, port: int) -> int | None:
    """The port bound on `host` (then released at once), or None if it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.suppress(OSError), socket.create_server((host, port), family=family) as sock:
        return sock.getsockname()[1]
    return None


def argv_for(config: WorkerPoolUpstream, worker: Worker) -> list[str]:
    argv = [substitute(arg, worker) for arg in config.command]
    if argv[0] == SELF_COMMAND:
        argv[:1] = [sys.executable, "-m", "gateway"]
    return argv


def env_for(config: WorkerPoolUpstream, worker: Worker) -> dict[str, str]:
    # Unbuffered, so a Python worker's output reaches the log as it is written.
    env = {"PYTHONUNBUFFERED": "1", **os.environ}
    env.update((key, substitute(value, worker)) for key, value in config.env.items())
    if worker.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = worker.gpu
    return env


def out_of_rotation(worker: Worker, now: float, ready_timeout: float) -> str | None:
    """Why `worker` is out of rotation, as one status line (for /readyz); None when it serves."""
    n = worker.failures
    crashes = f"{n} crash{'es' if n != 1 else ''} in a row"
    last = f"(last: {worker.last_failure})"
    if worker.state == STARTING and n == 0:
        waited = duration(now - worker.since)
        problem = f"starting, not ready after {waited} (of {ready_timeout:g}s)"
    elif worker.state == STARTING:
        problem = f"starting again after {crashes} {last}"
    elif worker.state == BACKOFF:
        wait = duration(max(0.0, worker.next_try_at - now))
        problem = f"restarting after {crashes}, next try in {wait} {last}"
    elif worker.state == FAILING:
        problem = f"out of rotation, {worker.probe_failures} failed health probes in a row"
    elif worker.state == STOPPED:
        problem = "stopped"
    else:
        return None
    return f"{worker.label}: {problem}"


def duration(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
