"""Real Redis topologies for tests, on free ports, stopped after: a Sentinel-managed master with
one replica and three sentinels, and a three-master Cluster.

    with SentinelGroup() as group:      # group.url is redis+sentinel://.../mymaster/0
        await group.ready()             # sentinels know the replica and each other
        group.kill_master(); await group.failed_over()

    with RedisCluster3() as cluster:    # cluster.url is redis+cluster://...
        ...

Waits are bounded polls of the servers' own state (there is no event to wait on across
processes); each gives up with the state it last saw.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from tests.support.redis_server import RedisServer, free_port, redis_server_binary

SERVICE = "mymaster"
SENTINEL_DOWN_AFTER_MS = 400
"""How long the master must be silent before sentinels call it down (seconds in production)."""


async def poll(check, timeout: float, what: str, every: float = 0.05):
    """Until `await check()` returns something truthy (returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except (OSError, ConnectionError) as exc:  # a server restarting or being promoted
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last seen: {last!r})")


class _Process:
    def __init__(self, argv: list[str], port: int, cwd: Path) -> None:
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, cwd=cwd)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _wait_listening(port: int, proc: _Process) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"redis on port {port} exited with {proc.proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"redis on port {port} did not listen within 5s")


def _base_argv(port: int) -> list[str]:
    return [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
    ]


class SentinelGroup:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sg-sentinel-"))
        self.master = RedisServer()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: list[_Process] = []

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{nodes}/{SERVICE}/0"

    def __enter__(self) -> SentinelGroup:
        try:
            self.master.start_sync()
            argv = _base_argv(self.replica_port) + [
                "--replicaof",
                "127.0.0.1",
                str(self.master.port),
            ]
            replica = _Process(argv, self.replica_port, self.dir)
            self.procs.append(replica)
            _wait_listening(self.replica_port, replica)
            for port in self.sentinel_ports:
                conf = self.dir / f"sentinel-{port}.conf"
                conf.write_text(
                    f"port {port}\nbind 127.0.0.1\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} {SENTINEL_DOWN_AFTER_MS}\n"
                    f"sentinel failover-timeout {SERVICE} 3000\n"
                )
                argv = [redis_server_binary(), str(conf), "--sentinel", "--loglevel", "warning"]
                sentinel = _Process(argv, port, self.dir)
                self.procs.append(sentinel)
                _wait_listening(port, sentinel)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        self.master.stop_sync()

    async def _each_sentinel(self, command: str, *args: str) -> list:
        answers = []
        for port in self.sentinel_ports:
            async with Redis(port=port, socket_timeout=1) as sentinel:
                answers.append(await sentinel.execute_command(command, *args))
        return answers

    async def ready(self, timeout: float = 10) -> None:
        """Every sentinel knows the replica and the two other sentinels, and the replica is in
        sync: only then can a killed master be failed over."""

        async def known() -> bool:
            replicas = await self._each_sentinel("SENTINEL", "REPLICAS", SERVICE)
            peers = await self._each_sentinel("SENTINEL", "SENTINELS", SERVICE)
            async with Redis(port=self.replica_port, socket_timeout=1) as replica:
                link = (await replica.info("replication")).get("master_link_status")
            return (
                all(len(r) == 1 for r in replicas)
                and all(len(p) == 2 for p in peers)
                and (link == "up")
            )

        await poll(known, timeout, "sentinels discovering the replica and each other")

    def kill_master(self) -> None:
        self.master.stop_sync()

    async def failed_over(self, timeout: float = 12) -> None:
        """Until every sentinel names the former replica as the master, and it takes writes."""

        async def promoted() -> bool:
            masters = await self._each_sentinel("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            if not all(m and int(m[1]) == self.replica_port for m in masters):
                return False
            async with Redis(port=self.replica_port, socket_timeout=1) as new_master:
                return (await new_master.info("replication"))["role"] == "master"

        await poll(promoted, timeout, "sentinels promoting the replica")


def redis_cli_binary() -> str:
    """redis-cli (it creates the cluster); missing, skip or fail as for redis-server."""
    found = shutil.which("redis-cli")
    if found:
        return found
    reason = "!!! REDIS CLUSTER TESTS NOT RUN: no redis-cli binary found. !!!"
    if os.environ.get("STREAMGATE_REQUIRE_REDIS") == "1":
        pytest.fail(reason + " STREAMGATE_REQUIRE_REDIS=1 makes this a failure.", pytrace=False)
    pytest.skip(reason)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisCluster3:
    """Three masters, no replicas, every slot covered."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sg-cluster-"))
        self.ports = [_cluster_port() for _ in range(3)]
        self.procs: list[_Process] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def __enter__(self) -> RedisCluster3:
        try:
            for port in self.ports:
                argv = _base_argv(port) + [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-node-timeout",
                    "2000",
                ]
                node = _Process(argv, port, self.dir)
                self.procs.append(node)
                _wait_listening(port, node)
            create = [
                redis_cli_binary(),
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ]
            subprocess.run(create, check=True, capture_output=True, timeout=20)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()

    async def ready(self, timeout: float = 10) -> None:
        async def ok() -> bool:
            for port in self.ports:
                async with Redis(port=port, socket_timeout=1) as node:
                    info = await node.execute_command("CLUSTER", "INFO")
                    text = info.decode() if isinstance(info, bytes) else str(info)
                    if "cluster_state:ok" not in text:
                        return False
            return True

        await poll(ok, timeout, "the cluster reaching cluster_state:ok")
