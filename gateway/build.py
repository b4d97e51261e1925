"""Build a runtime from a config: upstream pools with their protocol clients, worker pools,
admission, tracing. The one place that knows which adapter serves which upstream kind.
"""

from __future__ import annotations

import asyncio

from gateway.admission.admit import Admission
from gateway.config.model import GatewayConfig, GrpcUpstream, HttpUpstream, WorkerPoolUpstream
from gateway.engine.runtime import Runtime
from gateway.observe.metrics import Metrics
from gateway.observe.tracing import Tracing
from gateway.protocols.grpc.bridge import BridgeClient
from gateway.protocols.grpc.client import GrpcClient
from gateway.protocols.grpc.health import GrpcHealthChecker
from gateway.protocols.grpc.workers import GrpcWorkerSupervisor
from gateway.protocols.http.client import HttpClient
from gateway.protocols.ws.client import WsClient
from gateway.upstreams.health import HealthChecker
from gateway.upstreams.pool import http_pool
from gateway.upstreams.workers import WorkerSupervisor


async def start_runtime(
    config: GatewayConfig, metrics: Metrics, previous: Runtime | None = None
) -> Runtime:
    """Build everything `config` names. On reload, `previous` hands over what may be kept,
    but only once the new runtime is whole: if any part fails to start, what was started
    is stopped and `previous` keeps everything it had."""
    pools = {
        name: http_pool(name, upstream, metrics, _CLIENTS[type(upstream)])
        for name, upstream in config.upstreams.items()
        if not isinstance(upstream, WorkerPoolUpstream)
    }
    kept = previous.supervisors if previous is not None else {}
    supervisors: dict[str, WorkerSupervisor] = {}
    try:
        for pool in pools.values():
            await pool.start()
        await start_worker_pools(config, metrics, kept, supervisors)
        admission = await Admission.start(
            config, metrics, previous.admission if previous is not None else None
        )
        tracing = Tracing.from_config(config.telemetry.tracing)
    except BaseException:
        for pool in pools.values():
            await pool.close()
        started = [s for name, s in supervisors.items() if kept.get(name) is not s]
        await asyncio.gather(*(s.stop() for s in started))
        raise
    for name, supervisor in supervisors.items():
        if kept.get(name) is supervisor:
            del kept[name]  # taken over: the old runtime must not stop it
    pools.update((name, supervisor.pool) for name, supervisor in supervisors.items())
    runtime = Runtime(config, pools, metrics, admission, supervisors, tracing)
    for name, upstream in config.upstreams.items():
        if isinstance(upstream, WorkerPoolUpstream) or upstream.health is None:
            continue
        pool = pools[name]
        if isinstance(upstream, GrpcUpstream):
            checker = GrpcHealthChecker(pool, upstream.health, pool.clients["grpc"])
        else:
            checker = HealthChecker(pool, upstream.health)
        checker.start()
        runtime.health_checkers.append(checker)
    return runtime


def _clients(pool) -> HttpClient:
    """A pool's protocol clients: HTTP, and WebSocket over the same session."""
    http = HttpClient(pool)
    pool.clients["websocket"] = WsClient(http)
    return http


def _grpc_clients(pool) -> GrpcClient:
    """A gRPC pool's clients: gRPC calls, and HTTP requests bridged to gRPC methods."""
    grpc = pool.clients["grpc"] = GrpcClient(pool)
    pool.clients["grpc_bridge"] = BridgeClient(grpc)
    return grpc


_CLIENTS = {HttpUpstream: _clients, GrpcUpstream: _grpc_clients}


async def start_worker_pools(
    config: GatewayConfig,
    metrics: Metrics,
    kept: dict[str, WorkerSupervisor],
    supervisors: dict[str, WorkerSupervisor],
    pin_ports: bool = False,
) -> None:
    """Fill `supervisors` with one started supervisor per `worker_pool` upstream. One whose
    definition is unchanged in `kept` (the previous runtime's) is reused with its workers
    running; the previous runtime stops the others when it closes, once its streams are done.
    `pin_ports`: for pools whose worker URLs are handed to serving processes."""
    for name, upstream in config.upstreams.items():
        if not isinstance(upstream, WorkerPoolUpstream):
            continue
        if name in kept and kept[name].config == upstream:
            supervisors[name] = kept[name]
        else:
            grpc = upstream.protocol == "grpc"
            supervisor_type = GrpcWorkerSupervisor if grpc else WorkerSupervisor
            clients = _grpc_clients if grpc else _clients
            supervisors[name] = supervisor_type(name, upstream, metrics, clients)
            await supervisors[name].start()


def serving_processes(config: WorkerPoolUpstream, metrics: Metrics) -> WorkerSupervisor:
    """A supervisor's serving processes, kept like a worker pool (their private admin
    listeners are its endpoints); they write to the supervisor's own stdout and stderr."""
    restarts = metrics.process_restarts
    return WorkerSupervisor(
        "serving", config, metrics, _clients, restarts=restarts, inherit_output=True
    )
