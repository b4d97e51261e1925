"""The Redis client for `state.redis_url`, whatever the topology (config/redis_url.py).

Every topology gets the same bounds: connects within CALL_TIMEOUT_S, no retries inside the
client library (RedisState's `call` is the one place that decides what a failure means), a
bounded number of connections. What differs is how the server is found:

- single: the URL as is, through a pool whose callers wait (bounded) for a free connection;
- sentinel: every new connection asks the sentinels for the current master, so after a
  failover the first calls fail (StateUnavailable, then `on_error`), connections to the old
  master are dropped, and the next ones reach the promoted replica: no restart;
- cluster: redis-py's RedisCluster routes each script by its keys' hash slot (our keys carry
  hash tags so each script's keys share one slot) and follows MOVED after resharding or a
  failover.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from gateway.config.redis_url import RedisTarget, parse_redis_url


class Client(NamedTuple):
    redis: Any
    """A redis.asyncio Redis or RedisCluster."""
    aclose: Callable[[], Awaitable[None]]
    where: str
    """Where it points, without credentials (for logs)."""


def connect(url: str, call_timeout_s: float, max_connections: int) -> Client:
    target = parse_redis_url(url)
    common: dict[str, Any] = {
        "socket_connect_timeout": call_timeout_s,
        "retry": Retry(NoBackoff(), 0),
        # Reads are bounded by RedisState.call's own timeout; a socket timeout as well would
        # only add a timer per read.
    }
    if target.kind == "single":
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=call_timeout_s, **common
        )
        client = Redis.from_pool(pool)
        return Client(client, client.aclose, _without_credentials(url))
    auth = {"username": target.username, "password": target.password, "ssl": target.tls}
    where = f"{urlsplit(url).scheme}://{_nodes(target)}"
    if target.kind == "sentinel":
        # Sentinels answer a discovery query each; a dead one must not hold a call for long.
        bounds = {"socket_connect_timeout": call_timeout_s, "socket_timeout": call_timeout_s}
        sentinel = Sentinel(target.nodes, sentinel_kwargs=bounds)
        master = sentinel.master_for(
            target.service, db=target.db, max_connections=max_connections, **auth, **common
        )

        async def aclose() -> None:
            await master.aclose()
            await sentinel.aclose()

        return Client(master, aclose, f"{where}/{target.service}/{target.db}")
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        max_connections=max_connections,
        **auth,
        **common,
    )
    return Client(cluster, cluster.aclose, where)


def _nodes(target: RedisTarget) -> str:
    return ",".join(f"{host}:{port}" for host, port in target.nodes)


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.hostname is None:  # unix://PATH
        return f"{parts.scheme}://{parts.path}"
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
