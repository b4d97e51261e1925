"""`state.redis_url`: which Redis topology it names, parsed once (at load time, for checks).

    redis://[user:password@]host:port/db       one server (also rediss://, unix://PATH)
    redis+sentinel://[user:password@]host:port,host:port/SERVICE[/db]
                                               the master of SERVICE, found through these
                                               sentinels, and found again after a failover
    redis+cluster://[user:password@]host:port,host:port
                                               a Redis Cluster, discovered from these nodes
                                               (db 0 only; every script's keys share a slot)

`rediss+sentinel://` and `rediss+cluster://` speak TLS to the data nodes. Credentials apply
to the data nodes; sentinels are asked without them.
"""

from __future__ import annotations

from typing import Literal, NamedTuple
from urllib.parse import unquote, urlsplit


class RedisTarget(NamedTuple):
    kind: Literal["single", "sentinel", "cluster"]
    nodes: tuple[tuple[str, int], ...]
    """Sentinels, or cluster seed nodes (empty for `single`: the URL is used as is)."""
    service: str | None
    db: int
    username: str | None
    password: str | None
    tls: bool


class BadRedisUrl(ValueError):
    pass


def parse_redis_url(url: str) -> RedisTarget:
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise BadRedisUrl("expected SCHEME://..., e.g. redis://127.0.0.1:6379/0")
    base, _, topology = scheme.partition("+")
    if base not in ("redis", "rediss", "unix") or topology not in ("", "sentinel", "cluster"):
        raise BadRedisUrl(
            f"unknown scheme '{scheme}' (use redis://, rediss://, unix://, "
            "redis+sentinel:// or redis+cluster://)"
        )
    if not topology:
        return RedisTarget("single", (), None, 0, None, None, base == "rediss")
    if base == "unix":
        raise BadRedisUrl(f"'{scheme}' is not a scheme: sentinels and clusters are reached by TCP")
    userinfo, _, hosts = rest.partition("/")[0].rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    nodes = tuple(_node(node) for node in hosts.split(","))
    path = [part for part in urlsplit(url).path.split("/") if part]
    if topology == "sentinel":
        if not path:
            raise BadRedisUrl("name the master's service: redis+sentinel://HOST:PORT,.../SERVICE")
        service, db = path[0], _db(path[1:])
    else:
        service, db = None, 0
        if path:
            raise BadRedisUrl("a cluster URL has no path (a cluster has only db 0)")
    return RedisTarget(
        topology,
        nodes,
        service,
        db,
        unquote(username) or None,
        unquote(password) or None,
        base == "rediss",
    )


def _node(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise BadRedisUrl(f"'{text}' is not HOST:PORT")
    return host.strip("[]"), int(port)


def _db(rest: list[str]) -> int:
    if not rest:
        return 0
    if len(rest) > 1 or not rest[0].isdigit():
        raise BadRedisUrl(f"'/{'/'.join(rest)}' is not a database number")
    return int(rest[0])
