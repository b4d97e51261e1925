"""Secrets out of anything an operator can read: /admin/config, explain, logs.

Upstream header values can carry credentials (`Authorization: Bearer ...`), and Redis URLs can
carry a password; both are replaced before the config leaves the process.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"


def redacted_config(tree: Any) -> Any:
    """A JSON-ready copy of `dataclasses.asdict(config)` with secrets replaced."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            if key in ("headers", "env") and isinstance(value, dict):
                out[key] = {name: REDACTED for name in value}
            elif key == "redis_url" and isinstance(value, str):
                out[key] = redacted_url(value)
            else:
                out[key] = redacted_config(value)
        return out
    if isinstance(tree, (list, tuple)):
        return [redacted_config(v) for v in tree]
    return tree


def redacted_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}{REDACTED}@{host}"))
