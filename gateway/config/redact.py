"""Secrets out of anything an operator can read: /admin/config, explain, logs.

Upstream header values can carry credentials (`Authorization: Bearer ...`), worker `env`
values can carry tokens, and Redis URLs can carry a password; all are replaced before the
config leaves the process. Route `match` values are not secrets and are shown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.config.model import GatewayConfig

REDACTED = "<redacted>"


def redacted_config(config: GatewayConfig) -> dict[str, Any]:
    """The effective config as JSON-ready data, secrets replaced."""
    tree = _plain(config)
    for upstream in tree["upstreams"].values():
        for key in ("headers", "env"):
            if key in upstream:
                upstream[key] = {name: REDACTED for name in upstream[key]}
    tree["state"]["redis_url"] = redacted_url(tree["state"]["redis_url"])
    return tree


def _plain(value: Any) -> Any:
    # dataclasses.asdict cannot copy the frozen mappings (MappingProxyType) the config holds.
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


def redacted_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    # The netloc as written after the credentials: a sentinel or cluster URL lists several
    # host:port pairs, which urlsplit's port parsing rejects.
    hosts = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:" if parts.username else ":"
    return urlunsplit(parts._replace(netloc=f"{user}{REDACTED}@{hosts}"))
