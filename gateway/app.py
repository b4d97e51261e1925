"""Build and run the gateway: the proxy listener, the admin listener, signals.

Start-up order: the config is loaded and validated whole before any listener opens; the
runtime (upstream pools, limits) is built; then the proxy and admin listeners start and one
line saying where is printed on stdout (tests and operators read it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

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
from gateway.protocols.http.connection import GatewayServer
from gateway.protocols.http.server import HttpServer
from gateway.protocols.ws.server import WsServer, is_upgrade
from gateway.tuning import install_event_loop_policy, settle_garbage_collector

log = logging.getLogger("streamgate")


class Gateway:
    watch_interval = 1.0
    """Seconds between looks at the config file for a change (tests shorten it)."""

    def __init__(self, config_path: str, config: GatewayConfig) -> None:
        self.config_path = config_path
        self.config = config
        self.proxy: Proxy | None = None
        self._runners: list[web.BaseRunner] = []
        self._proxy_site: web.TCPSite | None = None
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
        runtime = await start_runtime(self.config, self.metrics)
        self.proxy = Proxy(runtime)
        # handler_cancellation: a client that goes away cancels its handler, which closes the
        # upstream request. aiohttp's runners do not do this unless asked.
        server = GatewayServer(
            _dispatch(HttpServer(self.proxy), WsServer(self.proxy)),
            lambda: self.runtime.config.server,
            self.metrics,
            handler_cancellation=True,
            access_log=None,
        )
        # By the time runners are cleaned up, drain_and_stop has already waited for streams.
        proxy_runner = web.ServerRunner(server, handler_cancellation=True, shutdown_timeout=1.0)
        self._proxy_site, proxy_url = await self._listen(proxy_runner, self.config.server.listen)
        admin_runner = web.AppRunner(
            admin_app(self), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        _, admin_url = await self._listen(admin_runner, self.config.admin.listen)
        if self.config.server.grpc_listen is not None:
            self.grpc = GrpcServer(self.proxy)
            await self.grpc.start(self.config.server)
        if self.config_path and os.path.exists(self.config_path):
            self._watcher = asyncio.get_running_loop().create_task(self._watch_config())
        return proxy_url, admin_url

    async def _listen(
        self, runner: web.BaseRunner, listen: tuple[str, int]
    ) -> tuple[web.TCPSite, str]:
        await runner.setup()
        host, port = listen
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        bound = runner.addresses[0]
        return site, f"http://{_host_for_url(bound[0])}:{bound[1]}"

    async def _watch_config(self) -> None:
        """Reload when the file changes. stat() follows symlinks, so the atomic `..data`
        symlink swap of a Kubernetes ConfigMap update shows up as a new inode."""
        seen = _file_identity(self.config_path)
        while True:
            await asyncio.sleep(self.watch_interval)
            current = _file_identity(self.config_path)
            if current is not None and current != seen:
                seen = current
                log.info("config file changed on disk: reloading")
                await self.reload()

    async def reload(self) -> list[str]:
        """Load the config again; on success swap the runtime, else keep the old one."""
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> list[str]:
        try:
            config = load_config(self.config_path)
        except ConfigErrors as errors:
            self.metrics.config_reloads.labels("error").inc()
            messages = [str(e) for e in errors.errors]
            for message in messages:
                log.error("reload rejected: %s", message)
            return messages
        old = self.runtime
        assert self.proxy is not None
        try:
            runtime = await start_runtime(config, self.metrics, previous=old)
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
        if self._proxy_site is not None:
            await self._proxy_site.stop()
            self._proxy_site = None
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


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _serve(config_path: str, config: GatewayConfig) -> int:
    gateway = Gateway(config_path, config)
    proxy_url, admin_url = await gateway.start()
    settle_garbage_collector()
    grpc = f" (grpc {gateway.grpc.address})" if gateway.grpc is not None else ""
    print(f"streamgate listening on {proxy_url} (admin {admin_url}){grpc}", flush=True)
    loop = asyncio.get_running_loop()
    terms = 0

    def on_term() -> None:
        nonlocal terms
        terms += 1
        if terms == 1:
            log.info(
                "draining: new requests get 503; streams may run for %gs",
                config.server.shutdown_grace,
            )
            loop.create_task(gateway.drain_and_stop())
        else:
            loop.create_task(gateway.stop())

    loop.add_signal_handler(signal.SIGTERM, on_term)
    loop.add_signal_handler(signal.SIGINT, on_term)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(gateway.reload()))
    await gateway.wait_stopped()
    return 0


def serve(config_path: str) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(config_path)
    except ConfigErrors as errors:
        print(errors, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{config_path}: cannot read config: {exc.strerror}", file=sys.stderr)
        return 1
    install_event_loop_policy()
    return asyncio.run(_serve(config_path, config))


def _dispatch(http: HttpServer, ws: WsServer):
    """WebSocket upgrades to the WebSocket adapter, everything else to HTTP; routing still
    decides whether a route takes the session (only a route with a `websocket` block does)."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        if is_upgrade(request):
            return await ws.handle(request)
        return await http.handle(request)

    return handle
