"""gRPC children for tests: the scripted gRPC upstream and a BlazeRPC server (`blaze serve`),
each announcing `grpc://host:port` and waited on with grpc.health.v1; and a wait on the lines
a child prints (event-driven, bounded)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2

from tests.support.grpc_upstream import ANNOUNCE
from tests.support.procs import Subprocess

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
BLAZE_ANNOUNCE = re.compile(r"gRPC listening on (?P<url>\S+:\d+)")


class GrpcChild(Subprocess):
    """A child that serves gRPC; `lines_with(prefix)` waits for what it prints."""

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


class BlazeServer(GrpcChild):
    """`blaze serve APP --host 127.0.0.1 --port N`, the real BlazeRPC server (grpclib), run
    from `app_dir`; BLAZE_FINALLY names a file its generator appends to in `finally`."""

    def __init__(
        self, app_dir: Path, app: str, port: int, env: dict[str, str] | None = None
    ) -> None:
        blaze = str(Path(sys.executable).parent / "blaze")
        argv = [blaze, "serve", app, "--host", "127.0.0.1", "--port", str(port)]
        super().__init__(argv, BLAZE_ANNOUNCE, env={"PYTHONPATH": str(app_dir), **(env or {})})
        self.app_dir = app_dir

    @property
    def url(self) -> str:
        return "grpc://" + self.announced["url"]

    async def _wait_healthy(self) -> None:
        # BlazeRPC 2.2.1 registers grpc.health.v1, but its raw-bytes codec hands the health
        # servicer bytes instead of a request: every Check answers UNKNOWN. Listening is all
        # that can be waited for.
        async with aio.insecure_channel(self.target) as channel:
            await channel.channel_ready()
