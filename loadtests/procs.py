"""Child processes of a load test: spawn pinned, wait ready, stop them all whatever happens.

Every process a scenario needs (fake-llm, the gateway, nginx, wrk) is started through a
`ProcessGroup`, which stops what it started when the scenario ends, fails or is interrupted
(Ctrl-C cancels the main task; the group's `__aexit__` still runs). As a last resort, each
child is asked to be sent SIGTERM by the kernel should the runner itself die (PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import resource
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on (?P<url>https?://\S+)")
_PR_SET_PDEATHSIG = 1


class ChildFailed(RuntimeError):
    """A child exited, or did not announce itself or become ready in time."""


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        raise_fd_limit()
        if cpus:
            os.sched_setaffinity(0, cpus)  # what `taskset -c` does
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


def free_port() -> int:
    """A free 127.0.0.1 port, for programs that cannot listen on port 0 and tell (nginx)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Child:
    """One child process: started by `ProcessGroup.spawn`, stopped by `stop()`."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path
        self.stdout_lines: list[str] = []
        self.announced: re.Match[str] | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        assert self.announced is not None, f"{self.name} did not announce a URL"
        return self.announced["url"]

    async def read_announcement(self, pattern: re.Pattern[str]) -> re.Match[str]:
        assert self.proc.stdout is not None
        while line := (await self.proc.stdout.readline()).decode(errors="replace"):
            self.stdout_lines.append(line)
            if match := pattern.search(line):
                self.announced = match
                self.start_drain()
                return match
        code = await self.proc.wait()
        raise ChildFailed(f"{self.name} exited with {code} before announcing itself{self.tail()}")

    def start_drain(self) -> None:
        self._drain = asyncio.create_task(self._drain_stdout())

    async def _drain_stdout(self) -> None:
        # A child that keeps printing must never block on a full pipe.
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.stdout_lines.append(line.decode(errors="replace"))

    def tail(self, lines: int = 15) -> str:
        """The end of the child's stderr log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return ("\n  " + "\n  ".join(text)) if text else ""

    async def stop(self, timeout_s: float = 5.0) -> int:
        """SIGTERM, then SIGKILL past `timeout_s`; reap it and return its exit code."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout_s):
                    await self.proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        code = await self.proc.wait()
        if self._drain is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain, 2.0)
        return code


class ProcessGroup:
    """Starts children and stops every one of them on exit, last started first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    async def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: frozenset[int] | None = None,
        announce: re.Pattern[str] | None = LISTENING,
        ready: Callable[[Child], Awaitable[bool]] | None = None,
        start_timeout_s: float = 20.0,
        env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> Child:
        """Start `argv`; wait for its announcement line and/or `ready` to hold."""
        log_path = self.log_dir / f"{name}.{len(self.children)}.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=cwd,
                env={**os.environ, **(env or {})},
                preexec_fn=_child_setup(cpus),
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        try:
            async with asyncio.timeout(start_timeout_s):
                if announce is not None:
                    await child.read_announcement(announce)
                else:
                    child.start_drain()
                while ready is not None and not await ready(child):
                    if proc.returncode is not None:
                        raise ChildFailed(f"{name} exited with {proc.returncode}{child.tail()}")
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise ChildFailed(f"{name}: not ready in {start_timeout_s}s{child.tail()}") from None
        return child

    async def stop(self, child: Child) -> int:
        code = await child.stop()
        with contextlib.suppress(ValueError):
            self.children.remove(child)
        return code

    async def stop_all(self) -> None:
        while self.children:
            await self.stop(self.children[-1])

    async def __aenter__(self) -> ProcessGroup:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a second Ctrl-C must not leave children behind half-stopped.
        await asyncio.shield(self.stop_all())


async def port_accepts(host: str, port: int) -> bool:
    """Whether a TCP connect to host:port succeeds now."""
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
