"""The whole gateway configuration as frozen dataclasses.

This module is the schema: every field carries its unit, default and meaning beside it.
It does no I/O. `config_loader` turns YAML nodes into these objects, reading each field's
annotation to know how to parse it:

Route rules are declared in `routes.py`, limits in `limits.py`, the units in `units.py`.

- `Seconds` fields take duration strings (`250ms`, `5s`, `2m`, `1h`) and hold float seconds;
- `Bytes` fields take size strings (`512KiB`, `4MiB`, `1GB`) or plain integers and hold bytes;
- `Literal[...]` fields accept exactly the listed strings;
- `tuple[X, ...]` fields take YAML sequences, `Mapping[str, X]` fields take YAML mappings,
  nested dataclasses take YAML mappings with exactly their field names.

Names in the YAML are the field names here, except where a field's metadata says `yaml=`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from gateway.config.limits import (  # noqa: F401 -- declared there, part of this schema
    ConcurrencyLimit,
    LimitsConfig,
    RateLimit,
    TokenBudget,
    Weights,
)
from gateway.config.routes import Route
from gateway.config.telemetry import TelemetryConfig, TracingConfig  # noqa: F401 -- as limits
from gateway.config.units import Bytes, HostPort, KiB, MiB, Processes, Seconds, frozen_map

# --------------------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: HostPort = ("0.0.0.0", 8080)
    """Where clients connect."""
    max_request_body: Bytes = 4 * MiB
    """Larger request bodies get 413; bodies are buffered so retries can replay them."""
    shutdown_grace: Seconds = 300.0
    """How long streams in flight may run on after SIGTERM; long streams deserve minutes."""
    drain_delay: Seconds = 0.0
    """After SIGTERM, how long the listener keeps accepting (answering 503) so load balancers
    see /readyz fail before connections are refused."""
    max_header_bytes: Bytes = 60 * KiB
    """Bound on a request's header lines together (names, values and separators, the request
    line aside); beyond it, 431. Envoy's default. Each single line is also bounded (8 KiB,
    400) by the HTTP parser."""
    header_timeout: Seconds = 10.0
    """From the first byte of a request to the end of its headers; past it the client gets 408
    and the connection is closed, so trickled headers cannot hold a connection."""
    idle_timeout: Seconds = 60.0
    """How long a client connection may stay open with no request on it (before the first, or
    between keep-alive requests) before the gateway closes it."""
    body_timeout: Seconds = 30.0
    """The longest a whole request body may take to arrive once its headers are in; past it,
    408 and the connection is closed."""
    grpc_listen: HostPort | None = None
    """Where gRPC clients connect (HTTP/2, plaintext); absent: no gRPC listener. Calls take
    only routes with a `grpc` block; their request messages (bounded by `max_request_body`,
    within `body_timeout`) are buffered so retries can replay them."""
    workers: Processes = 1
    """Serving processes sharing `listen` (SO_REUSEPORT), one per core: `N` or `auto` (one
    per available CPU). Above 1, a supervisor process starts them, restarts a crashed one,
    reaches all of them with reloads and SIGTERM, and answers on `admin.listen` for all;
    `scope: local` limits and `max_connections` are split between them (README, "One process
    per core"). `streamgate serve --workers` overrides it; a change takes effect on restart."""


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: HostPort = ("127.0.0.1", 9901)
    """Serves /metrics /healthz /readyz /admin/*. Keep it off public interfaces."""


@dataclass(frozen=True, slots=True)
class StateConfig:
    backend: Literal["memory", "redis"] = "memory"
    """Where `scope: global` limits keep their state. `memory` needs nothing else."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """One server (`redis://[user:password@]host:port/db`, `rediss://`, `unix://PATH`); a
    Sentinel-managed master (`redis+sentinel://host:port,host:port/SERVICE[/db]`: found
    through the sentinels, followed across failovers without a restart); or a Redis Cluster
    (`redis+cluster://host:port,host:port`, seed nodes). See config/redis_url.py."""
    on_error: Literal["fail_open", "fail_closed"] = "fail_open"
    """When Redis is unreachable: `fail_open` keeps admitting, each replica enforcing the
    global limits on its own (so an outage loosens a limit by at most the replica count);
    `fail_closed` rejects with 503. Either way, Redis coming back needs no restart."""
    lease_ttl: Seconds = 10.0
    """Global concurrency units held by a dead replica come back after this long."""


# --------------------------------------------------------------------------- upstreams


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    url: str
    """Base URL (scheme, host, port, optional path prefix); the request path is appended.
    `ws://` and `wss://` are read as `http://` and `https://` (a WebSocket server answers
    HTTP too): whether a route speaks WebSocket to it is the route's choice."""
    weight: int = 1
    """Share of traffic under `balance: weighted`; ignored by the other policies."""


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str = "/health"
    interval: Seconds = 5.0
    timeout: Seconds = 2.0
    unhealthy_after: int = 3
    """Consecutive failed probes before the endpoint leaves rotation; one success brings it back."""


@dataclass(frozen=True, slots=True)
class EjectConfig:
    """Passive outlier detection, per endpoint and model sent upstream (see upstreams.py).

    What counts is a failure of the endpoint before the commit point: connect errors, resets,
    `first_chunk_timeout` and 5xx answers. Never: a 4xx (429 included), the client going
    away, the request's own `total` budget running out, `pool_exhausted` (the gateway's own
    cap), a stale keep-alive connection, or anything after the commit point (a stream cut or
    stalled once content flowed is that request's fault, counted in stream errors)."""

    consecutive_failures: int = 5
    """Failures in a row (see above) that eject the endpoint for that model; a success resets."""
    cooldown: Seconds = 30.0
    """Ejection time the first time; an endpoint ejected again is skipped `cooldown` times the
    number of its recent ejections, up to `max_cooldown`."""
    max_cooldown: Seconds = 300.0
    """Cap on the growing ejection time; an endpoint not ejected for this long starts over."""
    max_ejected_percent: int = 50
    """Percent (0-100) of an upstream's endpoints that may be ejected at once for one model,
    rounded down but at least one (so a lone endpoint can still be skipped for a fallback);
    0 turns ejection off. Failures past the cap keep counting and eject once room frees up."""
    panic_threshold: int = 50
    """Percent (0-100). When fewer than this share of the endpoints is in rotation for a model
    (ejected or failing health checks), the upstream is in panic and balances across all of
    them rather than overload the few or refuse with 503. An upstream with none in rotation is
    still skipped while a later fallback of the route has one. 0 turns panic off."""


Balance = Literal["round_robin", "least_outstanding", "weighted"]
Prefill = Literal["none", "assistant", "vllm"]


@dataclass(frozen=True, slots=True)
class HttpUpstream:
    endpoints: tuple[EndpointConfig, ...]
    kind: Literal["http"] = "http"
    headers: Mapping[str, str] = field(default_factory=frozen_map)
    """Added to every upstream request, replacing the client's header of the same name."""
    balance: Balance = "least_outstanding"
    health: HealthConfig | None = None
    """Active probes; without this block every endpoint counts as ready."""
    eject: EjectConfig = EjectConfig()
    max_connections: int = 256
    """Requests in flight to this upstream at once (all endpoints together; one connection
    each). A try that finds them all busy waits up to the route's `timeouts.queue` for one,
    then fails with the condition `pool_exhausted` (503 with Retry-After unless retried)."""
    prefill: Prefill = "none"
    """How a route's `resume` asks this upstream to continue a partial answer. `none` sends no
    prefill: the answer is asked for again and relayed past the text already sent, only if
    it begins with exactly that text (a deterministic backend, or `temperature: 0`).
    `assistant` appends an assistant message holding the partial text, which the backend
    continues (Anthropic's Messages API, llama.cpp's server). `vllm` does that and also sends
    `continue_final_message: true` and `add_generation_prompt: false` (vLLM, SGLang). A
    backend that refuses the prefill (400 or 422) is asked as with `none`. Never `assistant`
    for a backend that answers a final assistant message afresh (OpenAI's API does): the
    text would repeat."""


@dataclass(frozen=True, slots=True)
class ReadyConfig:
    path: str = "/health"
    timeout: Seconds = 120.0
    """A worker not answering 200 on `path` within this long after start is restarted."""
    interval: Seconds = 1.0
    """How often a running worker is probed."""


@dataclass(frozen=True, slots=True)
class RestartConfig:
    backoff: Seconds = 1.0
    max_backoff: Seconds = 30.0


@dataclass(frozen=True, slots=True)
class WorkerPoolUpstream:
    command: tuple[str, ...]
    """Argument vector; `{port}`, `{gpu}` and `{index}` are substituted per worker."""
    kind: Literal["worker_pool"] = "worker_pool"
    protocol: Literal["http", "grpc"] = "http"
    """What the workers serve: `http` (probed with GET `ready.path`), or `grpc` (reached at
    grpc://host:port, probed with grpc.health.v1; routes to it need `grpc` or `grpc_bridge`)."""
    gpus: tuple[str, ...] | None = None
    """One worker per entry, with CUDA_VISIBLE_DEVICES set to it. Exclusive with `count`."""
    count: int | None = None
    """Number of workers when no GPUs are named."""
    port_base: int | None = None
    """Worker i listens on port_base + i; by default the gateway picks free ports."""
    host: str = "127.0.0.1"
    env: Mapping[str, str] = field(default_factory=frozen_map)
    ready: ReadyConfig = ReadyConfig()
    restart: RestartConfig = RestartConfig()
    stop_grace: Seconds = 10.0
    """After SIGTERM, how long a worker may take to exit before SIGKILL."""
    headers: Mapping[str, str] = field(default_factory=frozen_map)
    balance: Balance = "least_outstanding"
    eject: EjectConfig = EjectConfig()
    max_connections: int = 256
    """As for `kind: http`: requests in flight to the pool at once, across its workers."""
    prefill: Prefill = "none"
    """As for `kind: http`: how a route's `resume` asks it to continue a partial answer."""


@dataclass(frozen=True, slots=True)
class GrpcHealthConfig:
    """Active probes through the standard `grpc.health.v1.Health/Check`."""

    service: str = ""
    """The service name asked about; "" asks about the server as a whole."""
    interval: Seconds = 5.0
    timeout: Seconds = 2.0
    unhealthy_after: int = 3
    """Consecutive probes not answered SERVING before the endpoint leaves rotation."""


@dataclass(frozen=True, slots=True)
class GrpcUpstream:
    """A gRPC server (HTTP/2). Calls are relayed as opaque messages, so no proto files are
    needed, except by an HTTP route that bridges to it (`grpc_bridge`)."""

    endpoints: tuple[EndpointConfig, ...]
    """`grpc://host:port` (plaintext) or `grpcs://host:port` (TLS, system roots); one HTTP/2
    channel per endpoint, shared by every call to it."""
    kind: Literal["grpc"] = "grpc"
    headers: Mapping[str, str] = field(default_factory=frozen_map, metadata={"yaml": "metadata"})
    """Metadata added to every call, replacing the client's entry of the same (lower-cased) key."""
    balance: Balance = "least_outstanding"
    health: GrpcHealthConfig | None = None
    """Active probes; without this block every endpoint counts as ready."""
    eject: EjectConfig = EjectConfig()
    max_connections: int = 256
    """Calls in flight to this upstream at once (all endpoints together); as for `kind: http`,
    a try that finds them all busy waits up to `timeouts.queue`, then fails as `pool_exhausted`."""
    max_message_size: Bytes = 4 * MiB
    """Largest response message accepted from the upstream (gRPC's own default); a larger one
    ends the call with RESOURCE_EXHAUSTED."""


Upstream = HttpUpstream | WorkerPoolUpstream | GrpcUpstream


# --------------------------------------------------------------------------- the whole


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]
    server: ServerConfig = ServerConfig()
    admin: AdminConfig = AdminConfig()
    state: StateConfig = StateConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    limits: LimitsConfig = LimitsConfig()
    source: str = field(default="<config>", metadata={"yaml": None})
    """The file this was loaded from (not a YAML key)."""
