"""The supervisor: `server.workers` serving processes on one port, and what they share.

    start    reserve the port (port.py); start the worker pools; write the bundle (the
             validated config text, the port, the workers' URLs: bundle.py); start the admin
             listener and the serving processes; announce once every process is ready (one
             that fails before its first ready fails the start, with exit status 1)
    crash    a process that exits, or fails its /healthz three times in a row, is restarted
             with backoff, by the same supervisor that keeps worker pools (upstreams/workers.py)
    reload   SIGHUP, POST /admin/reload or a change of the file: validated once, here; a
             config that fails is rejected whole and no process sees it. Otherwise changed
             worker pools start, the bundle is rewritten and every running process is asked to
             reload from it; if any refuses, all go back to the previous bundle
    drain    SIGTERM reaches every process, which drains as a lone gateway does; the
             supervisor exits once all have exited (a second SIGTERM: they stop at once)

Worker pools are supervised here, once: every process reaches the same workers, by URL, as a
plain HTTP upstream (config/processes.py); their ports stay fixed for the pool's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.admin.fanout import Process, fanout_app
from gateway.app import http_url, watch_file
from gateway.build import serving_processes, start_worker_pools
from gateway.config.loader import load_config_text, read_config_text
from gateway.config.model import GatewayConfig, ReadyConfig, RestartConfig, WorkerPoolUpstream
from gateway.errors import ConfigErrors
from gateway.observe.metrics import Metrics
from gateway.processes.asking import STARTING_S, ask_reload, streaming_on
from gateway.processes.bundle import Bundle
from gateway.processes.port import reserve_port
from gateway.processes.run import StartFailed
from gateway.upstreams.worker import READY
from gateway.upstreams.workers import WorkerSupervisor

log = logging.getLogger("streamgate.processes")

PROCESS_READY_TIMEOUT_S = STARTING_S
"""A serving process not answering /healthz this long after it was started is restarted."""
PROBE_INTERVAL_S = 1.0
POLL_S = 0.05
STOP_MARGIN_S = 10.0
"""Past its drain (`drain_delay` + `shutdown_grace`), what a process may take to end its
streams and exit before it is killed."""


class Supervisor:
    watch_interval = 1.0
    """Seconds between looks at the config file for a change."""

    def __init__(self, config_path: str, config: GatewayConfig) -> None:
        self.config_path = config_path
        self.config = config
        self.count = config.server.workers
        self.metrics = Metrics()
        self.draining = False
        self.pools: dict[str, WorkerSupervisor] = {}
        self._retiring: dict[WorkerSupervisor, asyncio.Task[None]] = {}
        self._serving: WorkerSupervisor | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="streamgate-"))
        self._bundle_path = self._dir / "config.json"
        self._bundle: Bundle | None = None
        self._port_holder: socket.socket | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._reloading = asyncio.Lock()
        self._stopping: asyncio.Future[None] | None = None
        self._stopped = asyncio.Event()

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> tuple[str, str]:
        try:
            text = read_config_text(self.config_path)
            self.config = load_config_text(text, self.config_path, workers=self.count)
        except ConfigErrors as errors:
            raise StartFailed(str(errors)) from None
        host, port = self.config.server.listen
        self._port_holder, port = reserve_port(host, port)
        self._session = aiohttp.ClientSession()
        admin_url = await self._serve_admin()
        await start_worker_pools(self.config, self.metrics, {}, self.pools, pin_ports=True)
        self._bundle = Bundle(text, self.config_path, self.count, port, _urls(self.pools))
        self._bundle.write(self._bundle_path)
        self._serving = serving_processes(self._process_pool(), self.metrics)
        await self._serving.start()
        await self._until_all_ready(self._serving)
        watching = watch_file(self.config_path, lambda: self.watch_interval, self.reload)
        self._watcher = asyncio.get_running_loop().create_task(watching)
        return http_url(host, port), admin_url

    async def _serve_admin(self) -> str:
        self._runner = web.AppRunner(
            fanout_app(self), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        host, port = self.config.admin.listen
        await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        return http_url(*self._runner.addresses[0][:2])

    def _process_pool(self) -> WorkerPoolUpstream:
        """The serving processes, described as the pool of workers they are kept as."""
        server = self.config.server
        command = ("streamgate", "serve", "--process-of", str(self._bundle_path))
        return WorkerPoolUpstream(
            command=(*command, "--process-index", "{index}", "--admin-port", "{port}"),
            count=self.count,
            ready=ReadyConfig("/healthz", PROCESS_READY_TIMEOUT_S, PROBE_INTERVAL_S),
            restart=RestartConfig(backoff=1.0, max_backoff=30.0),
            stop_grace=server.drain_delay + server.shutdown_grace + STOP_MARGIN_S,
        )

    async def _until_all_ready(self, serving: WorkerSupervisor) -> None:
        """Return once every process is ready; a failure before that fails the start."""
        while not all(w.state == READY for w in serving.workers):
            for worker in serving.workers:
                if worker.failures:
                    raise StartFailed(f"serving process {worker.index} {worker.last_failure}")
            await asyncio.sleep(POLL_S)

    async def drain_and_stop(self) -> None:
        self.draining = True
        await self._shut_down()

    async def stop(self) -> None:
        """Stop now: processes already draining get a second SIGTERM and end their streams."""
        if self.draining:
            for process in self.processes():
                if process.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGTERM)
        self.draining = True
        await self._shut_down()

    async def _shut_down(self) -> None:
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop_all())
        await asyncio.shield(self._stopping)

    async def _stop_all(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self._serving is not None:
            await self._serving.stop()  # each drains, up to its stop_grace
        for task in self._retiring.values():
            task.cancel()
        pools = [*self.pools.values(), *self._retiring]
        await asyncio.gather(*(pool.stop() for pool in pools))
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        if self._port_holder is not None:
            self._port_holder.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ----------------------------------------------------------------- what the admin reads

    def processes(self) -> list[Process]:
        if self._serving is None:
            return []
        return [
            Process(
                w.index,
                w.process.pid if w.process is not None else None,
                w.endpoint.url,
                w.state,
                w.failures,
                w.process is not None and w.process.alive,
            )
            for w in self._serving.workers
        ]

    def status(self) -> list[str]:
        return self._serving.status() if self._serving is not None else ["starting"]

    def pools_status(self) -> list[str]:
        return [line for pool in self.pools.values() for line in pool.status()]

    # ----------------------------------------------------------------- reload

    async def reload(self) -> list[str]:
        async with self._reloading:
            errors = await self._reload()
        self.metrics.config_reloads.labels("error" if errors else "ok").inc()
        for error in errors:
            log.error("reload rejected: %s", error)
        return errors

    async def _reload(self) -> list[str]:
        try:
            text = read_config_text(self.config_path)
            config = load_config_text(text, self.config_path, workers=self.count)
        except ConfigErrors as errors:
            return [str(e) for e in errors.errors]
        assert self._bundle is not None and self._serving is not None
        kept, pools = dict(self.pools), {}
        try:
            await start_worker_pools(config, self.metrics, kept, pools, pin_ports=True)
        except Exception as exc:  # e.g. a worker command that cannot run: keep the old one
            await _stop_started(pools, kept)
            return [f"{self.config_path}: the new config could not be started: {exc}"]
        previous = self._bundle
        bundle = dataclasses.replace(previous, text=text, worker_urls=_urls(pools))
        errors = await self._reload_processes(bundle)
        if errors:  # back to the config the others serve
            await self._reload_processes(previous)
            await _stop_started(pools, kept)
            return errors
        self.config, self._bundle = config, bundle
        self._serving.config = self._process_pool()  # shutdown_grace may have changed
        for name, pool in self.pools.items():
            if pools.get(name) is not pool:
                self._retiring[pool] = asyncio.ensure_future(self._retire(pool))
        self.pools = pools
        log.info("config reloaded from %s by every serving process", self.config_path)
        return []

    async def _reload_processes(self, bundle: Bundle) -> list[str]:
        bundle.write(self._bundle_path)
        assert self._serving is not None
        asked = (ask_reload(self._session, w) for w in self._serving.workers)
        answers = await asyncio.gather(*asked)
        return [error for errors in answers for error in errors]

    async def _retire(self, pool: WorkerSupervisor) -> None:
        """Stop a worker pool a reload replaced, once no process streams on it any more (or
        `shutdown_grace` from now, whichever comes first)."""
        assert self._session is not None
        urls = {w.endpoint.url for w in pool.workers}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.server.shutdown_grace):
                while await streaming_on(self._session, self.processes(), urls):
                    await asyncio.sleep(PROBE_INTERVAL_S)
        await pool.stop()
        self._retiring.pop(pool, None)


def _urls(pools: dict[str, WorkerSupervisor]) -> dict[str, list[str]]:
    return {name: [w.endpoint.url for w in pool.workers] for name, pool in pools.items()}


async def _stop_started(
    pools: dict[str, WorkerSupervisor], kept: dict[str, WorkerSupervisor]
) -> None:
    await asyncio.gather(*(s.stop() for n, s in pools.items() if kept.get(n) is not s))
