"""Open the upstream response, retrying until the first content chunk is in hand.

This is the only place retries live. Everything before the commit point is retryable and
nothing has reached the client yet; `open_stream` either returns an `Opened` response (the
commit point has been reached, or a complete answer is ready to relay) or raises the
`GatewayError` the client should get.

Order of tries: the route's upstream, then each fallback. On each, up to `retry.attempts`
tries (the first included), preferring an endpoint this request has not tried. After a failure:
- a condition in `retry.fallback_on` moves to the next fallback at once;
- a condition in `retry.on` tries the same upstream again after backoff (an upstream
  `Retry-After` honoured up to `backoff.max`), then moves on;
- any other condition is final: an upstream's HTTP answer is relayed as sent, a connection
  failure becomes 502, a timeout 504.
When everything has failed, the client gets the most recent HTTP answer any upstream sent.

One kind of failure costs no try: one that provably never reached a live server process (the
connection was refused, or a reused keep-alive connection turned out dead before any response
byte, as when a worker was killed). It is retried at once on another endpoint (or a fresh
connection), at most once per endpoint of the upstream, without consuming a `retry.attempts`
try: the operator's count is of requests an upstream could have worked on. A refused connect
still counts toward ejection (the endpoint is down); a dead idle connection does not.

Each try first takes one of the upstream's `max_connections`, waiting up to `timeouts.queue`
(the gateway's own capacity, so it never eats the connect or first_chunk budget), else it fails
as `pool_exhausted`. Outlier state is per endpoint and the model sent on that hop.

aiohttp's exceptions are translated into the gateway's at this one boundary.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import sse
from .config import Backoff, Route
from .context import RequestContext
from .errors import (
    GatewayError,
    NoHealthyUpstream,
    PoolExhausted,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamStatus,
    UpstreamTimeout,
)
from .metrics import Metrics
from .upstreams import REQUEST_SENT, Endpoint, UpstreamPool

ERROR_BODY_LIMIT = 256 * 1024
"""An upstream error body larger than this is relayed as a stream, not inspected."""


@dataclass(slots=True)
class HeldResponse:
    """A complete upstream answer kept aside: the client gets it if every later try fails."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class Opened:
    """The upstream response the client will get, with what was read of it before committing."""

    __slots__ = ("status", "headers", "head", "complete", "sse", "response", "pool", "endpoint")

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        head: bytes,
        complete: bool,
        response: aiohttp.ClientResponse | None = None,
        pool: UpstreamPool | None = None,
        endpoint: Endpoint | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.head = head
        """Body bytes already read; written first."""
        self.complete = complete
        """The whole body is in `head`: nothing more to read from the upstream."""
        self.sse = headers.get("content-type", "").startswith("text/event-stream")
        self.response = response
        self.pool = pool
        self.endpoint = endpoint

    @classmethod
    def from_held(cls, held: HeldResponse) -> Opened:
        return cls(held.status, held.headers, held.body, complete=True)

    def finish(self, clean: bool) -> None:
        """Let go of the upstream: the connection returns to the pool only after a whole body;
        otherwise it is closed, so the backend stops generating for nobody."""
        if self.endpoint is not None:
            assert self.pool is not None
            self.pool.release(self.endpoint)
            self.endpoint = None
        if self.response is not None:
            if clean:
                self.response.release()
            else:
                self.response.close()
            self.response = None


class AttemptFailed(Exception):
    """One try that did not reach the commit point."""

    def __init__(
        self,
        error: GatewayError,
        conditions: tuple[str, ...],
        held: HeldResponse | None = None,
        retry_after: float | None = None,
        ejects: bool = True,
        free: bool = False,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.conditions = conditions
        """Names matched against retry.on / fallback_on: the status, error codes, or one of
        connect_error, reset, empty_body, first_chunk_timeout, total_timeout."""
        self.held = held
        self.retry_after = retry_after
        self.ejects = ejects
        """Counts toward passive ejection (connect errors, resets, timeouts and 5xx)."""
        self.free = free
        """Never reached a live server process: retried without consuming a try."""

    @property
    def reason(self) -> str:
        return self.conditions[0]


# ----------------------------------------------------------------- the retry loop


async def open_stream(
    ctx: RequestContext,
    route: Route,
    pools: Mapping[str, UpstreamPool],
    headers: CIMultiDict[str],
    metrics: Metrics,
) -> Opened:
    tries = _Tries(ctx, route, headers, metrics)
    hops = _hops(route)
    loop = asyncio.get_running_loop()
    for i, (upstream, model) in enumerate(hops):
        # A pool with nothing in rotation is skipped while a later hop has something; when
        # none has, it is tried anyway if in panic (rather than refusing the request).
        later = hops[i + 1 :]
        last_resort = not any(pools[u].has_endpoint_for(m or ctx.model) for u, m in later)
        opened = await tries.on_upstream(pools[upstream], model, last_resort)
        if opened is not None:
            return opened
        if loop.time() >= ctx.deadline:
            break
    if tries.held is not None:
        return Opened.from_held(tries.held)
    raise tries.error or NoHealthyUpstream("no upstream could be tried")


class _Tries:
    """One request's tries across its hops, and what the failed ones left behind."""

    __slots__ = ("ctx", "route", "headers", "metrics", "held", "error", "retry_reason")

    def __init__(
        self, ctx: RequestContext, route: Route, headers: CIMultiDict[str], metrics: Metrics
    ) -> None:
        self.ctx, self.route, self.headers, self.metrics = ctx, route, headers, metrics
        self.held: HeldResponse | None = None
        self.error: GatewayError | None = None
        self.retry_reason: str | None = None  # why the next try, if one happens, is a retry

    async def on_upstream(
        self, pool: UpstreamPool, model: str | None, last_resort: bool
    ) -> Opened | None:
        """Up to `retry.attempts` tries on one upstream: the Opened response, None to move on
        to the next hop, or (for an unlisted condition) the final answer raised or returned."""
        ctx, policy = self.ctx, self.route.retry
        body = _with_model(ctx, model)
        sent_model = model if model is not None else ctx.model
        tried: set[Endpoint] = set()
        attempt, free_left = 0, len(pool.endpoints)
        while attempt < policy.attempts:
            endpoint = pool.pick(tried, sent_model, last_resort)
            if endpoint is None:
                self.error = self.error or NoHealthyUpstream(
                    f"upstream {pool.name!r} has no endpoint in rotation"
                )
                return None
            self._count_retry()
            tried.add(endpoint)
            try:
                opened = await self._try(pool, endpoint, body, sent_model)
            except AttemptFailed as failed:
                self.held = failed.held or self.held
                self.error = failed.error
                if failed.free and free_left:
                    free_left -= 1
                    self.retry_reason = failed.reason
                    continue
                attempt += 1
                matched = _decide(failed.conditions, self.route)
                if matched is None:
                    return _final(failed, self.held)
                self.retry_reason = failed.reason
                if matched == "fallback" or attempt == policy.attempts:
                    return None
                if not await self._backoff(attempt, failed.retry_after):
                    return None
            else:
                return opened
        return None

    def _count_retry(self) -> None:
        if self.retry_reason is not None:  # a retry is a try that follows a failure
            self.metrics.child(self.metrics.retries, self.route.name, self.retry_reason).inc()
            self.ctx.trace.retry(self.retry_reason)
            self.retry_reason = None

    async def _try(
        self, pool: UpstreamPool, endpoint: Endpoint, body: bytes, model: str | None
    ) -> Opened:
        ctx, metrics = self.ctx, self.metrics
        ctx.upstream, ctx.endpoint = pool.name, endpoint.url
        ctx.attempts += 1
        span = ctx.trace.attempt(pool.name, endpoint.url, self.headers)
        try:
            opened = await _try_once(ctx, self.route, pool, endpoint, body, model, self.headers)
        except AttemptFailed as failed:
            outcome = _attempt_outcome(failed)
            span.failed(outcome, failed.reason, failed.held.status if failed.held else None)
            metrics.child(metrics.upstream_attempts, pool.name, outcome).inc()
            raise
        span.answered(opened.status)
        outcome = "ok" if opened.status < 400 else "upstream_error"
        metrics.child(metrics.upstream_attempts, pool.name, outcome).inc()
        return opened

    async def _backoff(self, attempt: int, retry_after: float | None) -> bool:
        """Sleep before the next try; False when that would run past the deadline."""
        loop = asyncio.get_running_loop()
        delay = backoff_delay(self.route.retry.backoff, attempt, retry_after)
        if loop.time() + delay >= self.ctx.deadline:
            return False
        await asyncio.sleep(delay)
        return True


def _attempt_outcome(failed: AttemptFailed) -> str:
    if isinstance(failed.error, PoolExhausted):
        return "pool_exhausted"
    if isinstance(failed.error, UpstreamTimeout):
        return "timeout"
    if isinstance(failed.error, UpstreamConnectError):
        return "connect_error"
    return "upstream_error"


def _hops(route: Route) -> list[tuple[str, str | None]]:
    return [(route.upstream, None)] + [(f.upstream, f.model) for f in route.fallbacks]


def _with_model(ctx: RequestContext, model: str | None) -> bytes:
    if model is None or ctx.json is None:
        return ctx.body
    return json.dumps({**ctx.json, "model": model}).encode()


def _decide(conditions: tuple[str, ...], route: Route) -> str | None:
    """ "fallback", "retry", or None when no condition is listed (the failure is final)."""
    policy = route.retry
    if any(c in policy.fallback_on for c in conditions):
        return "fallback"
    if any(c in policy.on for c in conditions):
        return "retry"
    return None


def _final(failed: AttemptFailed, held: HeldResponse | None) -> Opened:
    if failed.held is not None:
        return Opened.from_held(failed.held)
    raise failed.error


def backoff_delay(backoff: Backoff, retry_number: int, retry_after: float | None) -> float:
    """Exponential from `base`, capped at `max`; an upstream's Retry-After wins, up to `max`."""
    if retry_after is not None:
        return min(retry_after, backoff.max)
    delay = min(backoff.max, backoff.base * 2 ** (retry_number - 1))
    return random.uniform(delay / 2, delay) if backoff.jitter else delay


# ----------------------------------------------------------------- one try


async def _try_once(
    ctx: RequestContext,
    route: Route,
    pool: UpstreamPool,
    endpoint: Endpoint,
    body: bytes,
    model: str | None,
    headers: CIMultiDict[str],
) -> Opened:
    t = route.timeouts
    loop = asyncio.get_running_loop()
    try:
        await pool.acquire(endpoint, max(0.0, min(t.queue, ctx.deadline - loop.time())))
    except PoolExhausted as exc:
        condition = ("pool_exhausted",)
        raise AttemptFailed(exc, condition, retry_after=exc.retry_after, ejects=False) from None
    response: aiohttp.ClientResponse | None = None
    reused = False
    try:
        # Until the connection is ready, connect (aiohttp's own timeout) and first_chunk share
        # one bound; then the request goes out and first_chunk counts from there.
        async with asyncio.timeout_at(
            min(loop.time() + t.connect + t.first_chunk, ctx.deadline)
        ) as scope:

            def request_sent(on_reused_connection: bool) -> None:
                nonlocal reused
                reused = on_reused_connection
                scope.reschedule(min(loop.time() + t.first_chunk, ctx.deadline))

            assert pool.session is not None
            sent = REQUEST_SENT.set(request_sent)
            try:
                response = await pool.session.request(
                    ctx.method,
                    URL(endpoint.url + ctx.path, encoded=True),
                    data=body or None,
                    headers=_with_configured(headers, pool),
                    allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(
                        total=None, connect=t.connect, sock_connect=t.connect
                    ),
                )
            finally:
                REQUEST_SENT.reset(sent)
            opened = await _read_until_commit(ctx, route, response)
    except BaseException as exc:
        if response is not None:
            response.close()
        pool.release(endpoint)
        timeout_condition = (
            "total_timeout" if loop.time() >= ctx.deadline else "first_chunk_timeout"
        )
        failed = _translate(exc, timeout_condition, pool.name)
        if failed is None:
            raise
        if reused and response is None and failed.reason == "reset":
            # A keep-alive connection that died while idle: the endpoint's other idle ones
            # may have too, so the next try gets a fresh connection.
            failed.free, failed.ejects = True, False
            pool.drop_idle_connections(endpoint)
        if failed.ejects:
            pool.record_failure(endpoint, model)
        raise failed from exc
    if opened.status >= 500:
        pool.record_failure(endpoint, model)
    elif opened.status < 400:
        pool.record_success(endpoint, model)
    opened.pool, opened.endpoint = pool, endpoint
    if opened.complete:
        opened.finish(clean=True)  # nothing more to read: the connection can go back to the pool
    return opened


def _with_configured(headers: CIMultiDict[str], pool: UpstreamPool) -> CIMultiDict[str]:
    """Configured upstream headers replace the client's header of the same name."""
    if not pool.headers:
        return headers
    out = headers.copy()
    for name, value in pool.headers:
        out[name] = value
    return out


def _translate(exc: BaseException, timeout_condition: str, upstream: str) -> AttemptFailed | None:
    """The one boundary where aiohttp's and the OS's exceptions become the gateway's."""
    if isinstance(exc, AttemptFailed):
        return exc
    if isinstance(exc, TimeoutError):
        what = "first chunk" if timeout_condition == "first_chunk_timeout" else "total time"
        err = UpstreamTimeout(f"upstream {upstream!r} ran out of {what}", timeout_condition)
        # The request's own total budget running out is not the endpoint's fault.
        return AttemptFailed(err, (timeout_condition,), ejects=timeout_condition != "total_timeout")
    if isinstance(exc, (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError)):
        err = UpstreamConnectError(f"cannot connect to upstream {upstream!r}: {exc}")
        refused = isinstance(getattr(exc, "os_error", None), ConnectionRefusedError)
        return AttemptFailed(err, ("connect_error",), free=refused)
    if isinstance(exc, (aiohttp.ClientError, ConnectionError)):
        err = UpstreamReset(f"upstream {upstream!r} dropped the connection: {exc}")
        return AttemptFailed(err, ("reset",))
    return None  # cancellation and programming errors pass through


# ----------------------------------------------------------------- reading to the commit point


async def _read_until_commit(
    ctx: RequestContext, route: Route, response: aiohttp.ClientResponse
) -> Opened:
    status, headers = response.status, response.headers
    limit = route.buffer.bytes
    if status >= 400:
        body, complete = await _read_whole(response, ERROR_BODY_LIMIT)
        if complete:
            raise _status_failure(status, headers, body)
        return Opened(status, headers, body, complete=False, response=response)
    if headers.get("content-type", "").startswith("text/event-stream"):
        head, complete = await _read_to_first_event_with_content(response, limit)
        has_content = not complete or _sse_has_content(head)
    elif ctx.stream:
        head = await response.content.readany()
        complete = not head
        has_content = bool(head)
    else:
        head, complete = await _read_whole(response, limit)
        has_content = bool(head) or not complete
    if status == 200 and not has_content:
        held = HeldResponse(status, headers, head)
        err = UpstreamReset(f"upstream sent a 200 with no content ({len(head)} bytes)")
        raise AttemptFailed(err, ("empty_body",), held=held, ejects=False)
    return Opened(status, headers, head, complete, response=response)


async def _read_whole(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """Read the body to its end, or stop past `limit` bytes: (bytes, whether it ended)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        data = await response.content.readany()
        if not data:
            return b"".join(parts), True
        parts.append(data)
        size += len(data)
    return b"".join(parts), False


async def _read_to_first_event_with_content(
    response: aiohttp.ClientResponse, limit: int
) -> tuple[bytes, bool]:
    """Read until an event with content is complete (or past `limit`): (bytes, whether it ended)."""
    held = b""
    scanned = 0  # complete events before this offset have been judged content-less
    sep = b""
    while len(held) <= limit:
        data = await response.content.readany()
        if not data:
            return held, True
        held += data
        if not sep:
            if not sse.has_separator(held):
                continue  # no event is whole yet; which separator it uses is still unknown
            sep = sse.separator_of(held)
        complete, _ = sse.split_complete(held, sep)
        if len(complete) > scanned:
            if sse.has_content(complete[scanned:], sep):
                return held, False
            scanned = len(complete)
    return held, False


def _sse_has_content(body: bytes) -> bool:
    sep = sse.separator_of(body)
    # A body that ends without a final separator still ends its last event.
    return sse.has_content(body if body.endswith(sep) else body + sep, sep)


def _status_failure(status: int, headers: CIMultiDictProxy[str], body: bytes) -> AttemptFailed:
    codes = _error_codes(body)
    held = HeldResponse(status, headers, body)
    err = UpstreamStatus(f"upstream answered {status}", status)
    return AttemptFailed(
        err,
        (str(status), *codes),
        held=held,
        retry_after=_retry_after(headers.get("retry-after")),
        ejects=status >= 500,
    )


def _error_codes(body: bytes) -> tuple[str, ...]:
    """Error codes an OpenAI-style (or vLLM-style) JSON error body names."""
    try:
        payload = json.loads(body)
    except ValueError:
        return ()
    if not isinstance(payload, dict):
        return ()
    found: list[str] = []
    for source in (payload.get("error"), payload):
        if isinstance(source, dict):
            for key in ("code", "type"):
                value = source.get(key)
                if isinstance(value, str) and value:
                    found.append(value)
    return tuple(found)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
