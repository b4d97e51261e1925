"""gRPC children for tests: the scripted gRPC upstream and a BlazeRPC server (`blaze serve`),
each announcing `grpc://host:port` and waited on with grpc.health.v1; and a wait on the lines
a child prints (event-driven, bounded)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc import aio
from grpc_health.v1 import health_pb2

from tests.support.grpc_upstream import ANNOUNCE
from tests.support.procs import ChildFailed, Subprocess

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
BLAZE_ANNOUNCE = re.compile(r"gRPC listening on (?P<url>\S+:\d+)")


class GrpcChild(Subprocess):
    """A child that serves gRPC (announcing `grpc://host:port`, healthy by grpc.health.v1);
    `lines_with(prefix)` waits for what it prints."""

    def __init__(self, argv: list[str], announce: re.Pattern[str], **kw) -> None:
        super().__init__(argv, announce=announce, **kw)
        self._printed = asyncio.Condition()

    @property
    def target(self) -> str:
        """host:port, as grpc channels take it."""
        return self.url.removeprefix("grpc://")

    @property
    def port(self) -> int:
        return int(self.target.rpartition(":")[2])

    async def _wait_healthy(self) -> None:
        async with aio.insecure_channel(self.target) as channel:
            check = channel.unary_unary(HEALTH_CHECK)
            while self.proc.returncode is None:
                try:
                    await check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=1)
                    return
                except aio.AioRpcError:
                    await asyncio.sleep(0.02)

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.stdout_lines.append(line.decode(errors="replace"))
            async with self._printed:
                self._printed.notify_all()
        async with self._printed:
            self._printed.notify_all()

    async def lines_with(self, prefix: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        """The first `count` lines printed that start with `prefix`, waiting up to `timeout`."""

        def found() -> list[str]:
            return [line for line in self.stdout_lines if line.startswith(prefix)]

        async with asyncio.timeout(timeout), self._printed:
            await self._printed.wait_for(lambda: len(found()) >= count)
        return found()[:count]


class ScriptedGrpc(GrpcChild):
    """`python -m tests.support.grpc_upstream --port 0 ARGS...`."""

    def __init__(self, *args: str) -> None:
        argv = [sys.executable, "-m", "tests.support.grpc_upstream", "--port", "0", *args]
        super().__init__(argv, ANNOUNCE)


class BlazeServer:
    """`blaze serve APP --host 127.0.0.1 --port N`, the real BlazeRPC server (grpclib), as a
    plain child process shared by a test module (it takes seconds to start): what it prints
    goes to a file, which `lines_with` reads."""

    def __init__(self, app_dir: Path, app: str) -> None:
        self.app_dir, self.app = app_dir, app
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.url = f"grpc://{self.target}"
        self.log = app_dir / f"blaze-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        blaze = str(Path(sys.executable).parent / "blaze")
        argv = [blaze, "serve", self.app, "--host", "127.0.0.1", "--port", str(self.port)]
        env = {**os.environ, "PYTHONPATH": str(self.app_dir)}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=self.app_dir, env=env, stdout=out)
        deadline = time.monotonic() + timeout
        # BlazeRPC 2.2.1 registers grpc.health.v1, but its raw-bytes codec hands the health
        # servicer bytes instead of a request (every Check answers UNKNOWN): listening is all
        # that can be waited for.
        while not BLAZE_ANNOUNCE.search(self.log.read_text(errors="replace")) or not _listens(
            self.port
        ):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ChildFailed(f"{argv}: not serving in {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def lines_with(self, prefix: str, timeout: float = 5.0) -> list[str]:
        """The lines it printed that start with `prefix`, once there is one (bounded)."""
        async with asyncio.timeout(timeout):
            while True:
                lines = self.log.read_text(errors="replace").splitlines()
                found = [line for line in lines if line.startswith(prefix)]
                if found:
                    return found
                await asyncio.sleep(0.005)


def _listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def require_blazerpc() -> None:
    """Skip loudly without the `blazerpc` package (fail under STREAMGATE_REQUIRE_TOOLS=1)."""
    if (Path(sys.executable).parent / "blaze").exists():
        return
    reason = (
        "!!! BLAZERPC TESTS NOT RUN: no `blaze` command beside this Python "
        "(pip install -e '.[test]' installs blazerpc). What they check is untested. !!!"
    )
    if os.environ.get("STREAMGATE_REQUIRE_TOOLS") == "1":
        pytest.fail(reason + " STREAMGATE_REQUIRE_TOOLS=1 makes this a failure.", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    """A port nothing listens on now (for a server that cannot pick its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
