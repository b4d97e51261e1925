"""A private redis-server for tests: a free port on 127.0.0.1, no persistence, stopped after.

    with RedisServer() as redis:
        ... redis.url ...
        await redis.stop(); await redis.start()   # an outage, then recovery on the same port

Never the shared server on 6379. When `REDIS_URL` is set, tests that only need *a* Redis use
it instead of starting one (tests/test_redis_limits.py's `redis_url` fixture); tests that stop
Redis always start their own. Without a `redis-server` binary those tests are skipped with a
loud reason, unless STREAMGATE_REQUIRE_REDIS=1 (CI), where that is a failure.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

BINARY_CANDIDATES = ("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
START_TIMEOUT_S = 5.0


def redis_server_binary() -> str:
    """The redis-server to run, or skip (fail, when STREAMGATE_REQUIRE_REDIS=1) loudly."""
    for candidate in BINARY_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    reason = (
        "!!! REDIS TESTS NOT RUN: no redis-server binary found (install redis-server, or set "
        "REDIS_URL). Global limits are untested in this run. !!!"
    )
    if os.environ.get("STREAMGATE_REQUIRE_REDIS") == "1":
        pytest.fail(reason + " STREAMGATE_REQUIRE_REDIS=1 makes this a failure.", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """`redis-server --port N --save "" --appendonly no` as a child process."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start_sync(self) -> None:
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--loglevel", "warning",
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=Path("/tmp"))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if _answers_ping(self.port):
                return
            time.sleep(0.01)
        self.stop_sync()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 5s")

    def stop_sync(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()  # SIGKILL: an outage, not a shutdown (nothing to save anyway)
        proc.wait(timeout=5)

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)

    def __enter__(self) -> RedisServer:
        self.start_sync()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_sync()


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
