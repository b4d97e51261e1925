"""The units config values are written in, and small helpers the declarations share."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated

Seconds = Annotated[float, "duration"]
"""A duration: written `250ms`, `5s`, `2m`, `1h` (or a bare number of seconds); held in seconds."""
Bytes = Annotated[int, "size"]
"""A size: written `512KiB`, `4MiB`, `1GB` (or a bare number of bytes); held in bytes."""
HostPort = Annotated[tuple[str, int], "hostport"]
"""A listen address: written `HOST:PORT` (`0.0.0.0:8080`, `[::1]:8080`); held as (host, port)."""

KiB = 1024
MiB = 1024 * 1024


def frozen_map() -> Mapping:
    return MappingProxyType({})
