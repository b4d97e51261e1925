"""One serving gateway: the proxy listener, the admin listener, reload and drain.

Start-up order: the config is loaded and validated whole before any listener opens; the
runtime (upstream pools, limits) is built; then the proxy and admin listeners start, and
`processes/run.py` prints one line saying where on stdout (tests and operators read it) and
wires the signals. With `server.workers` above 1 a supervisor runs several of these
(`processes/`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.admin.server import admin_app
from gateway.build import start_runtime
from gateway.config.loader import load_config
from gateway.config.model import GatewayConfig
from gateway.engine.pipeline import Proxy
from gateway.engine.runtime import Runtime
from gateway.errors import ConfigErrors, Draining
from gateway.observe.metrics import Metrics
from gateway.protocols.grpc.server import GrpcServer
from gateway.protocols.http.listener import HttpListener
from gateway.protocols.http.server import HttpServer
from gateway.protocols.ws.server import WsServer

log = logging.getLogger("streamgate")


class Gateway:
    watch_interval: float | None = 1.0
    """Seconds between looks at the config file for a change (tests shorten it); None: never."""
    reuse_port = False
    """Bind the proxy listener with SO_REUSEPORT, beside the other serving processes."""

    def __init__(self, config_path: str, config: GatewayConfig) -> None:
        self.config_path = config_path
        self.config = config
        self.proxy: Proxy | None = None
        self._runners: list[web.BaseRunner] = []
        self._listener: HttpListener | None = None
        self._watcher: asyncio.Task | None = None
        self._reloading = asyncio.Lock()
        self._retired: set[Runtime] = set()
        """Runtimes a reload replaced, closing once their streams are done."""
        self._stopped = asyncio.Event()
        self._draining = False
        self.grpc: GrpcServer | None = None
        """The gRPC listener, when `server.grpc_listen` is set (its `address` once started)."""
        self.metrics = Metrics(lambda: self.proxy.runtime if self.proxy is not None else None)

    @property
    def runtime(self) -> Runtime:
        assert self.proxy is not None
        return self.proxy.runtime

    @property
    def draining(self) -> bool:
        return self._draining

    async def start(self) -> tuple[str, str]:
        runtime = await self.start_runtime(self.config)
        self.proxy = Proxy(runtime)
        self._listener = HttpListener(
            HttpServer(self.proxy).handle,
            WsServer(self.proxy).handle,
            lambda: self.runtime.config.server,
            self.metrics,
        )
        host, port = self.config.server.listen
        proxy_url = http_url(*await self._listener.start(host, port, self.reuse_port))
        admin_runner = web.AppRunner(
            admin_app(self), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        admin_url = await self._listen(admin_runner, self.config.admin.listen)
        if self.config.server.grpc_listen is not None:
            self.grpc = GrpcServer(self.proxy)
            await self.grpc.start(self.config.server)
        if self.watch_interval and self.config_path and os.path.exists(self.config_path):
            watching = watch_file(self.config_path, lambda: self.watch_interval, self.reload)
            self._watcher = asyncio.get_running_loop().create_task(watching)
        return proxy_url, admin_url

    async def _listen(self, runner: web.BaseRunner, listen: tuple[str, int]) -> str:
        await runner.setup()
        host, port = listen
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        bound = runner.addresses[0]
        return http_url(bound[0], bound[1])

    async def start_runtime(
        self, config: GatewayConfig, previous: Runtime | None = None
    ) -> Runtime:
        """Build what `config` names; `previous`, on reload, hands over what may be kept."""
        return await start_runtime(config, self.metrics, previous=previous)

    def load(self) -> GatewayConfig:
        """The config a reload switches to (raises ConfigErrors)."""
        return load_config(self.config_path)

    async def reload(self) -> list[str]:
        """Load the config again; on success swap the runtime, else keep the old one."""
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> list[str]:
        try:
            config = self.load()
        except ConfigErrors as errors:
            self.metrics.config_reloads.labels("error").inc()
            messages = [str(e) for e in errors.errors]
            for message in messages:
                log.error("reload rejected: %s", message)
            return messages
        old = self.runtime
        assert self.proxy is not None
        try:
            runtime = await self.start_runtime(config, previous=old)
        except Exception as exc:  # e.g. a worker pool that cannot start: keep the old one
            self.metrics.config_reloads.labels("error").inc()
            log.exception("reload rejected: the new config could not be started")
            return [f"{self.config_path}: the new config could not be started: {exc}"]
        for section, key in (("server", "listen"), ("admin", "listen"), ("server", "grpc_listen")):
            was, now = getattr(self.config, section), getattr(config, section)
            if getattr(was, key) != getattr(now, key):
                log.warning("%s.%s changed: it takes effect on restart", section, key)
        self.proxy.runtime = runtime
        self.config = config
        self.metrics.config_reloads.labels("ok").inc()
        log.info("config reloaded from %s", self.config_path)
        self._retired.add(old)
        closing = asyncio.get_running_loop().create_task(_close_when_idle(old))
        closing.add_done_callback(lambda _: self._retired.discard(old))
        return []

    async def drain_and_stop(self) -> None:
        """Graceful shutdown, in order: /readyz fails and new requests get 503 at once; after
        `drain_delay` (for load balancers to notice) the listener closes; requests in flight
        run on for up to `shutdown_grace`; streams still going then end with an error event
        (outcome `shutdown`); then everything stops."""
        if self._draining:
            return
        self._draining = True
        proxy = self.proxy
        assert proxy is not None
        proxy.draining = True
        await asyncio.sleep(self.config.server.drain_delay)
        if self._listener is not None:
            self._listener.close()
        try:
            await asyncio.wait_for(proxy.idle(), self.config.server.shutdown_grace)
        except TimeoutError:
            log.warning("shutdown grace over: ending %d streams", len(proxy.in_flight))
            for ctx in list(proxy.in_flight):
                if ctx.abort is not None:
                    ctx.abort(Draining("the gateway is shutting down"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proxy.idle(), 5.0)
        await self.stop()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.grpc is not None:  # streams were drained or ended with the proxy's
            await self.grpc.stop(grace=1.0)
        if self._listener is not None:  # its streams were drained or ended with the proxy's
            await self._listener.stop()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        if self.proxy is not None:
            await self.proxy.runtime.close()
        for old in list(self._retired):
            await asyncio.gather(*(s.stop() for s in old.supervisors.values()))
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def watch_file(
    path: str, interval: Callable[[], float | None], reload: Callable[[], Awaitable[object]]
) -> None:
    """Reload when the file changes, looking every `interval()` seconds (None: stop). stat()
    follows symlinks, so the atomic `..data` symlink swap of a Kubernetes ConfigMap update
    shows up as a new inode."""
    seen = _file_identity(path)
    while seconds := interval():
        await asyncio.sleep(seconds)
        current = _file_identity(path)
        if current is not None and current != seen:
            seen = current
            log.info("config file changed on disk: reloading")
            await reload()


def _file_identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # mid-swap, or removed: keep serving, look again later
    return st.st_ino, st.st_mtime_ns, st.st_size


async def _close_when_idle(runtime: Runtime) -> None:
    """Close a runtime a reload replaced, once no request uses it any more."""
    await runtime.idle()
    await runtime.close()


def http_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
