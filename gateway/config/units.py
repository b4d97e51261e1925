"""The units config values are written in, and small helpers the declarations share."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated

Seconds = Annotated[float, "duration"]
"""A duration: written `250ms`, `5s`, `2m`, `1h` (or a bare number of seconds); held in seconds."""
Bytes = Annotated[int, "size"]
"""A size: written `512KiB`, `4MiB`, `1GB` (or a bare number of bytes); held in bytes."""
HostPort = Annotated[tuple[str, int], "hostport"]
"""A listen address: written `HOST:PORT` (`0.0.0.0:8080`, `[::1]:8080`); held as (host, port)."""
Processes = Annotated[int, "processes"]
"""A number of processes: a whole number, or `auto` for one per CPU this process may run on
(`available_cpus()`, resolved where the config is loaded); held as the number."""

KiB = 1024
MiB = 1024 * 1024


def frozen_map() -> Mapping:
    return MappingProxyType({})


def available_cpus() -> int:
    """The CPUs this process may run on: its affinity mask (taskset, cpusets), which
    os.cpu_count() ignores; a CPU quota (a Kubernetes limit) is not seen by either."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
