"""Real child processes for tests: spawn, read the announced URL, wait healthy, stop.

    async with FakeLLM("--ttft", "0.2") as llm:
        ... llm.url, llm.port, llm.proc ...

`Subprocess` knows nothing about fake-llm: a child that prints a line matching `announce`
(with a `url` group) and then answers `health_path` with 200 can be run the same way, e.g.
`python -m gateway serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from types import TracebackType

import aiohttp
from yarl import URL

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on (?P<url>https?://\S+)")


class ChildFailed(RuntimeError):
    """The child exited, or did not announce itself or become healthy in time."""


class Subprocess:
    """One child process, started with `start()` (or `async with`) and ended with `stop()`."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        announce: re.Pattern[str] = LISTENING,
        health_path: str = "/health",
        start_timeout_s: float = 15.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.announce = announce
        self.health_path = health_path
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.proc: asyncio.subprocess.Process | None = None
        self.announced: re.Match[str] | None = None
        self.stdout_lines: list[str] = []  # everything the child printed, announcement included
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        assert self.announced is not None, "not started"
        return self.announced["url"]

    @property
    def port(self) -> int:
        port = URL(self.url).port
        assert port is not None
        return port

    async def start(self) -> None:
        """Spawn; raise ChildFailed unless it announces itself and answers health in time."""
        # stderr is inherited: pytest's fd capture shows it with a failing test.
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, env=self.env, cwd=REPO_ROOT
        )
        try:
            async with asyncio.timeout(self.start_timeout_s):
                self.announced = await self._read_announcement()
                self._drain = asyncio.create_task(self._drain_stdout())
                await self._wait_healthy()
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TimeoutError):
                raise ChildFailed(f"{self.argv}: not ready in {self.start_timeout_s}s") from exc
            raise

    async def stop(self) -> int:
        """SIGTERM, then SIGKILL past `stop_timeout_s`; reap it and return its exit code."""
        proc = self.proc
        assert proc is not None, "not started"
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self.stop_timeout_s):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        returncode = await proc.wait()
        if self._drain is not None:
            await self._drain  # ends with the child's stdout
        return returncode

    async def __aenter__(self) -> Subprocess:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _read_announcement(self) -> re.Match[str]:
        assert self.proc is not None and self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode(errors="replace"):
            self.stdout_lines.append(line)
            if match := self.announce.search(line):
                return match
        code = await self.proc.wait()
        raise ChildFailed(f"{self.argv}: exited with {code} before announcing itself")

    async def _drain_stdout(self) -> None:
        # A child that keeps printing must never block on a full pipe.
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.stdout_lines.append(line.decode(errors="replace"))

    async def _wait_healthy(self) -> None:
        assert self.proc is not None
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while self.proc.returncode is None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(self.url + self.health_path) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.02)
        raise ChildFailed(f"{self.argv}: exited with {self.proc.returncode} before healthy")


class FakeLLM(Subprocess):
    """`python -m gateway.fake_llm --port 0 ARGS...` as a real child process."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__([sys.executable, "-m", "gateway.fake_llm", "--port", "0", *args], env=env)


async def start_fake_llm(*args: str, env: dict[str, str] | None = None) -> FakeLLM:
    """A started fake-llm; the caller owes it `await llm.stop()`."""
    llm = FakeLLM(*args, env=env)
    await llm.start()
    return llm
