"""One worker process: spawned as the leader of its own process group, tied to the gateway's
life, its output logged line by line, and stopped as a whole group.

Why both a process group and a parent-death signal:
- `start_new_session=True` makes the worker lead a new session and process group, so one
  `killpg` reaches the helpers it forks too (vLLM's tensor-parallel workers, a `sh -c` wrapper's
  child), and a Ctrl-C in the gateway's terminal does not hit the workers behind its back;
- `PR_SET_PDEATHSIG` (Linux) has the kernel SIGKILL the worker when the gateway dies in any way,
  SIGKILL included, when no `stop()` will ever run. It reaches the group leader only: helpers
  the worker forks must watch their own parent, as vLLM's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence

log = logging.getLogger("streamgate.workers")

PR_SET_PDEATHSIG = 1
OUTPUT_LINE_LIMIT = 1024 * 1024
"""Longest output line kept whole; longer ones are replaced by a note (progress bars drawn
with carriage returns can grow this long)."""
OUTPUT_DRAIN_S = 1.0
"""After the group is gone, how long to wait for the rest of its output (a helper that left
the group may hold the pipe open for ever)."""


def _load_prctl() -> Callable[[int, int], int] | None:
    # Resolved here, in the parent: nothing between fork and exec should load libraries.
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong)
    prctl.restype = ctypes.c_int
    return prctl


_prctl = _load_prctl()


def _die_with(parent_pid: int) -> Callable[[], None] | None:
    if _prctl is None:
        return None

    def preexec() -> None:  # runs in the child between fork and exec: keep it minimal
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the gateway died before the signal was armed
            os._exit(1)

    return preexec


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with status {returncode}"


class WorkerProcess:
    """`spawn()` once, then `wait()` for its exit and `stop()` it (both may be awaited again)."""

    def __init__(
        self, argv: Sequence[str], env: Mapping[str, str], label: str, inherit_output: bool = False
    ) -> None:
        self.argv = tuple(argv)
        self.env = dict(env)
        self.label = label
        """Prefix of every output line in the log, e.g. `local-gpu[1]`."""
        self.inherit_output = inherit_output
        """Write to the gateway's own stdout and stderr rather than through its log, line by
        line (a serving process's access log must stay one JSON line per request)."""
        self.proc: asyncio.subprocess.Process | None = None
        self._output: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        """Spawned and not yet exited (as far as the event loop has seen)."""
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self) -> None:
        """Start the process; raises OSError when the command cannot be run."""
        spawning = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=None if self.inherit_output else asyncio.subprocess.PIPE,
                stderr=None if self.inherit_output else asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with(os.getpid()),
                limit=OUTPUT_LINE_LIMIT,
            )
        )
        try:
            self.proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # The fork may be done already: keep hold of the child, so stop() can end it.
            with contextlib.suppress(Exception):
                self.proc = await spawning
            raise
        finally:
            if self.proc is not None and self.proc.stdout is not None and self._output is None:
                self._output = asyncio.create_task(self._log_output(self.proc.stdout))

    async def wait(self) -> int:
        assert self.proc is not None, "not spawned"
        return await self.proc.wait()

    async def stop(self, grace_s: float) -> None:
        """SIGTERM the group; SIGKILL what is left of it after `grace_s`; reap the leader."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await proc.wait()
            except TimeoutError:
                if grace_s > 0:
                    log.warning(
                        "%s: still running %gs after SIGTERM; killing it", self.label, grace_s
                    )
        # Also after a clean exit: helpers the leader left behind in its group go too.
        self._signal_group(signal.SIGKILL)
        await proc.wait()
        await self._finish_output()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        # The group id is the leader's pid. The kernel does not reuse that number while any
        # member of the group lives; once none does, it could only reach a stranger that took
        # the number and made itself a group leader: in practice, it reaches nobody.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def _finish_output(self) -> None:
        if self._output is None or self._output.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._output), OUTPUT_DRAIN_S)
        except TimeoutError:
            self._output.cancel()

    async def _log_output(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # longer than OUTPUT_LINE_LIMIT; the reader has dropped it
                log.info(
                    "%s | (an output line over %d bytes was dropped)", self.label, OUTPUT_LINE_LIMIT
                )
                continue
            if not line:
                return
            log.info("%s | %s", self.label, line.decode(errors="replace").rstrip())
