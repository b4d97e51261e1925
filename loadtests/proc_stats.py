"""CPU time and resident memory of a process tree, read from /proc; and a sampler over time.

CPU is utime + stime from /proc/PID/stat (clock ticks, whole process, every thread), summed
over the process and its descendants (nginx's master and worker). Resident memory is
/proc/PID/statm's resident pages, summed the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (through /proc/PID/task/TID/children)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of every pid, in seconds."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                # The command name may hold spaces: fields are counted after its ')'.
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / _TICKS_PER_S


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/statm") as f:
            total += int(f.read().split()[1]) * _PAGE_BYTES
    return total


@dataclass
class Usage:
    """A point reading of a process tree."""

    at: float  # time.monotonic()
    cpu_s: float
    rss: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        pids = tree(pid)
        return cls(time.monotonic(), cpu_seconds(pids), rss_bytes(pids))

    @classmethod
    def of_self(cls) -> Usage:
        """This process alone (the load generator), without its children."""
        return cls(time.monotonic(), cpu_seconds([os.getpid()]), rss_bytes([os.getpid()]))


@dataclass
class Timeline:
    """Readings every `interval_s`, for the CPU and RSS over time plots."""

    label: str
    samples: list[Usage] = field(default_factory=list)

    def series(self) -> dict[str, list[float]]:
        """Seconds since the first sample, CPU % of one core, RSS MiB."""
        if len(self.samples) < 2:
            return {"t": [], "cpu_pct": [], "rss_mib": []}
        t0 = self.samples[0].at
        pairs = zip(self.samples, self.samples[1:], strict=False)
        cpu = [100 * (b.cpu_s - a.cpu_s) / max(b.at - a.at, 1e-9) for a, b in pairs]
        return {
            "t": [s.at - t0 for s in self.samples[1:]],
            "cpu_pct": cpu,
            "rss_mib": [s.rss / 2**20 for s in self.samples[1:]],
        }


class Sampler:
    """`async with Sampler(pid, label) as timeline:` samples the tree until the block ends."""

    def __init__(self, pid: int, label: str, interval_s: float = 0.25) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.timeline = Timeline(label)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.timeline.samples.append(Usage.of(self.pid))
            await asyncio.sleep(self.interval_s)

    async def __aenter__(self) -> Timeline:
        self._task = asyncio.create_task(self._run())
        return self.timeline

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.timeline.samples.append(Usage.of(self.pid))



@dataclass(frozen=True)
class CoreTimes:
    """Where the given cores' time went since boot (seconds, from /proc/stat): `task` is
    user + nice + system, the processes' own time; `irq` is irq + softirq, the kernel's network
    work, which loopback traffic puts on whichever core it lands; `steal` is the hypervisor's."""

    task: float
    irq: float
    steal: float

    @classmethod
    def of(cls, cpus: frozenset[int] | None) -> CoreTimes | None:
        if not cpus:
            return None
        task = irq = steal = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    user, nice, system, _idle, _iowait, hard, soft, stolen = map(int, fields[:8])
                    task += user + nice + system
                    irq += hard + soft
                    steal += stolen
        return cls(task / _TICKS_PER_S, irq / _TICKS_PER_S, steal / _TICKS_PER_S)



class CoreWatch:
    """What else ran on the proxy's core while it was measured: start it before, ask after."""

    def __init__(self, cpus: frozenset[int] | None) -> None:
        self.cpus = cpus
        self.before = CoreTimes.of(cpus)

    def shares(self, proxy_cpu_s: float, wall_s: float) -> dict[str, float]:
        """% of the core: other processes' own time, kernel irq+softirq, hypervisor steal."""
        after = CoreTimes.of(self.cpus)
        if self.before is None or after is None or wall_s <= 0:
            return {}
        def pct(seconds: float) -> float:
            return 100 * max(0.0, seconds) / wall_s

        return {
            "others": pct(after.task - self.before.task - proxy_cpu_s),
            "irq": pct(after.irq - self.before.irq),
            "steal": pct(after.steal - self.before.steal),
        }


async def wait_for_quiet(max_wait_s: float, busy_below: float = 0.25) -> float:
    """Wait, at most `max_wait_s`, until the machine's cores are less than `busy_below` busy
    over a second (other jobs share it); the busy fraction last seen."""
    cpus = frozenset(os.sched_getaffinity(0))
    deadline = time.monotonic() + max_wait_s
    while True:
        before = CoreTimes.of(cpus)
        await asyncio.sleep(1.0)
        after = CoreTimes.of(cpus)
        assert before is not None and after is not None
        busy = (after.task + after.irq + after.steal - before.task - before.irq - before.steal)
        fraction = max(0.0, busy / len(cpus))
        if fraction < busy_below or time.monotonic() >= deadline:
            return fraction
