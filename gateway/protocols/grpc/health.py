"""Active health probes for `kind: grpc` upstreams: the standard `grpc.health.v1.Health/Check`
on each endpoint's own channel. Rotation is decided as for HTTP probes (`HealthChecker`)."""

from __future__ import annotations

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2

from gateway.config.model import GrpcHealthConfig
from gateway.protocols.grpc.client import GrpcClient
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.health import HealthChecker
from gateway.upstreams.pool import UpstreamPool

CHECK = "/grpc.health.v1.Health/Check"


class GrpcHealthChecker(HealthChecker):
    def __init__(self, pool: UpstreamPool, config: GrpcHealthConfig, client: GrpcClient) -> None:
        super().__init__(pool, config)
        self.client = client
        self._request = health_pb2.HealthCheckRequest(service=config.service).SerializeToString()

    async def _probe(self, endpoint: Endpoint) -> None:
        check = self.client.channel(endpoint.url).unary_unary(CHECK)
        try:
            raw = await check(self._request, timeout=self.config.timeout)
            status = health_pb2.HealthCheckResponse.FromString(raw).status
            ok = status == health_pb2.HealthCheckResponse.SERVING
            problem = f"answered {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        except aio.AioRpcError as exc:
            ok, problem = False, f"{exc.code().name}: {exc.details()}"
        except grpc.RpcError as exc:  # pragma: no cover - aio raises AioRpcError
            ok, problem = False, str(exc)
        self._record(endpoint, ok, problem)
