"""The local worker pool: streamgate starts its own backends and keeps them serving.

A `WorkerSupervisor` owns one `kind: worker_pool` upstream: an `UpstreamPool` with one endpoint
per worker, and one task per worker that goes round this loop:

    spawn    the command with `{port}` `{gpu}` `{index}` substituted (in `env` values too),
             CUDA_VISIBLE_DEVICES={gpu}, in a process group of its own (worker_process.py)
    ready    probe `ready.path` until it answers 200; then the endpoint joins rotation.
             Not ready within `ready.timeout`: restart
    live     probe every `ready.interval`. A failed probe takes the endpoint out of rotation
             at once and a passing one puts it back; LIVENESS_FAILURES in a row restart it.
             The process exiting takes it out at once (not at the next probe) and restarts it
    backoff  stop what is left of its process group, wait, go round again

The wait doubles with each failure in a row, from `restart.backoff` up to `max_backoff`. A worker
that stayed in rotation for `max_backoff` had recovered: its next failure waits the base again.
Every restart counts in streamgate_worker_restarts_total and is logged; `status()` says which
workers are out of rotation and why, for /readyz.

`start()` returns at once: the gateway serves while workers load their models, and each joins
rotation when it is ready. Streams on a worker that dies are ended by the relay, like those on any
upstream connection that breaks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from gateway.config.model import WorkerPoolUpstream
from gateway.observe.metrics import Metrics
from gateway.upstreams.pool import UpstreamPool
from gateway.upstreams.worker import (
    BACKOFF,
    FAILING,
    READY,
    STARTING,
    STOPPED,
    Worker,
    argv_for,
    choose_port,
    duration,
    env_for,
    out_of_rotation,
)
from gateway.upstreams.worker_process import WorkerProcess, exit_reason

log = logging.getLogger("streamgate.workers")

LIVENESS_FAILURES = 3
"""Failed probes in a row that get a worker in rotation restarted (the first one already takes
it out of rotation)."""
PROBE_TIMEOUT_S = 2.0
"""A probe slower than this has failed; a serving worker answers its health path in milliseconds."""
READY_POLL_S = 0.1
"""How often a starting worker is probed: it joins rotation this soon after it is ready."""
CRASH_LOOP_AFTER = 3
"""Failures in a row from which a worker's restarts are logged as errors (a crash loop)."""

class WorkerSupervisor:
    def __init__(
        self,
        name: str,
        config: WorkerPoolUpstream,
        metrics: Metrics,
        client: Callable[[UpstreamPool], Any],
        *,
        restarts: Any = None,
        pin_ports: bool = False,
        inherit_output: bool = False,
    ) -> None:
        """`client` builds the protocol client the workers are reached with. `restarts` is the
        counter child restarts count in (default streamgate_worker_restarts_total{upstream});
        `pin_ports` keeps each worker's first port for good (others were told its URL);
        `inherit_output` has workers write to the gateway's stdout and stderr, not its log."""
        self.name = name
        self.config = config
        self._metrics = metrics
        self._restarts = restarts or metrics.worker_restarts.labels(name)
        self._pin_ports, self._inherit_output = pin_ports, inherit_output
        gpus = config.gpus if config.gpus is not None else (None,) * (config.count or 0)
        self.workers: list[Worker] = []
        for index, gpu in enumerate(gpus):
            port = choose_port(config, index, None, {w.port for w in self.workers})
            self.workers.append(Worker(f"{name}[{index}]", index, gpu, port, self._url(port)))
        endpoints = (w.endpoint for w in self.workers)
        self.pool = UpstreamPool(name, config, endpoints, metrics, client)
        """What routes send traffic to; an endpoint is healthy while its worker is in rotation."""
        self._probes: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping: asyncio.Future[None] | None = None

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Spawn the workers and return at once; each joins rotation when it is ready."""
        await self.pool.start()
        self._probes = aiohttp.ClientSession(
            # No keep-alive: a connection to a worker's previous process would fail one probe.
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._supervise(w), name=f"supervise {w.label}") for w in self.workers
        ]

    async def stop(self) -> None:
        """Take every worker out of rotation, SIGTERM its group, SIGKILL it after `stop_grace`.
        Safe to call more than once, or concurrently; a cancelled caller does not cut it short."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers:
            worker.endpoint.healthy = False
            worker.enter(STOPPED)
        grace = self.config.stop_grace
        await asyncio.gather(*(w.process.stop(grace) for w in self.workers if w.process))
        await self.pool.close()
        if self._probes is not None:
            await self._probes.close()
        log.info("%s: workers stopped", self.name)

    def status(self) -> list[str]:
        """One line per worker out of rotation, saying why (for /readyz); empty when all serve."""
        now = time.monotonic()
        timeout = self.config.ready.timeout
        return [problem for w in self.workers if (problem := out_of_rotation(w, now, timeout))]

    # ----------------------------------------------------------------- one worker's loop

    async def _supervise(self, worker: Worker) -> None:
        while True:
            try:
                failure = await self._run_once(worker)
            except Exception:  # a bug here must not leave the worker unsupervised
                log.exception("%s: supervision failed", worker.label)
                failure = "supervision error (see the log)"
            worker.endpoint.healthy = False
            if worker.process is not None:
                await worker.process.stop(self.config.stop_grace)
            await asyncio.sleep(self._count_failure(worker, failure))

    async def _run_once(self, worker: Worker) -> str:
        """Spawn the worker and watch it until it fails; returns why it failed."""
        others = {w.port for w in self.workers if w is not worker}
        if not self._pin_ports:
            worker.port = choose_port(self.config, worker.index, worker.port, others)
        worker.endpoint.url = self._url(worker.port)
        argv, env = argv_for(self.config, worker), env_for(self.config, worker)
        worker.process = WorkerProcess(argv, env, worker.label, self._inherit_output)
        worker.ready_at = None
        worker.enter(STARTING)
        try:
            await worker.process.spawn()
        except OSError as exc:
            return f"cannot run {worker.process.argv[0]!r}: {exc.strerror or exc}"
        log.info("%s: started, pid %d, port %d", worker.label, worker.process.pid, worker.port)
        exited = asyncio.ensure_future(worker.process.wait())
        # Out of rotation the moment it dies, not at the next probe.
        exited.add_done_callback(lambda _: self._left(worker))
        try:
            failure = await self._until_ready(worker, exited)
            return failure if failure is not None else await self._while_in_rotation(worker, exited)
        finally:
            exited.cancel()

    def _left(self, worker: Worker) -> None:
        """The worker's process is gone: out of rotation, and its idle keep-alive connections
        closed, since a request sent on one would meet a dead socket (or, once the port is
        reused, a new process that never saw it)."""
        worker.endpoint.healthy = False
        self.pool.drop_idle_connections(worker.endpoint)

    async def _until_ready(self, worker: Worker, exited: asyncio.Future[int]) -> str | None:
        """None once `ready.path` answers 200; else why the worker must be restarted."""
        deadline = time.monotonic() + self.config.ready.timeout
        while not exited.done():
            if await self._probe(worker) and not exited.done():
                self._join_rotation(worker)
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"not ready within {self.config.ready.timeout:g}s"
            await asyncio.wait((exited,), timeout=min(READY_POLL_S, remaining))
        return exit_reason(exited.result())

    async def _while_in_rotation(self, worker: Worker, exited: asyncio.Future[int]) -> str:
        """Probe until the process exits or LIVENESS_FAILURES probes in a row fail."""
        while True:
            await asyncio.wait((exited,), timeout=self.config.ready.interval)
            if exited.done():
                return exit_reason(exited.result())
            passed = await self._probe(worker)
            if exited.done():
                return exit_reason(exited.result())
            if passed:
                if worker.state == FAILING:
                    log.info("%s: health probe passes again; back in rotation", worker.label)
                worker.probe_failures, worker.state = 0, READY
                worker.endpoint.healthy = True
                continue
            worker.endpoint.healthy = False
            worker.probe_failures += 1
            worker.state = FAILING
            if worker.probe_failures >= LIVENESS_FAILURES:
                return f"health probe failed {worker.probe_failures} times in a row"
            if worker.probe_failures == 1:
                log.warning("%s: health probe failed; out of rotation", worker.label)

    async def _probe(self, worker: Worker) -> bool:
        assert self._probes is not None
        try:
            async with self._probes.get(worker.endpoint.url + self.config.ready.path) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _join_rotation(self, worker: Worker) -> None:
        endpoint = worker.endpoint
        # Passive ejection counted the previous process's failures; this one starts clean.
        self.pool.outliers.forget(endpoint)
        endpoint.healthy = True
        worker.probe_failures = 0
        worker.enter(READY)
        worker.ready_at = worker.since
        assert worker.process is not None
        log.info("%s: ready on %s, pid %d", worker.label, endpoint.url, worker.process.pid)

    def _count_failure(self, worker: Worker, failure: str) -> float:
        """Record a failure and count the restart; returns the wait before the next start."""
        restart = self.config.restart
        now = time.monotonic()
        if worker.ready_at is not None and now - worker.ready_at >= restart.max_backoff:
            worker.failures = 0  # it had recovered: a fresh failure, not one more in a loop
        worker.failures += 1
        ceiling = max(restart.max_backoff, restart.backoff)
        delay = min(restart.backoff * 2 ** min(worker.failures - 1, 30), ceiling)
        worker.enter(BACKOFF)
        worker.last_failure, worker.next_try_at = failure, now + delay
        self._restarts.inc()
        loop_note = " (crash loop)" if worker.failures >= CRASH_LOOP_AFTER else ""
        log.log(
            logging.ERROR if loop_note else logging.WARNING,
            "%s: %s; restarting in %s, failure %d in a row%s",
            worker.label,
            failure,
            duration(delay),
            worker.failures,
            loop_note,
        )
        return delay

    # ----------------------------------------------------------------- what a worker runs

    def _url(self, port: int) -> str:
        host = self.config.host
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
