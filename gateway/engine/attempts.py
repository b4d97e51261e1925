"""Open the upstream answer, retrying until the commit point is in hand.

This is the only place retries live, for every protocol. Everything before the commit point is
retryable and nothing has reached the client yet; `open_stream` either returns an `Opened`
answer (the commit point has been reached, or a complete answer is ready to relay) or raises
the `GatewayError` the client should get.

Order of tries: the route's upstream, then each fallback. On each, up to `retry.attempts`
tries (the first included), preferring an endpoint this request has not tried. After a failure:
- a condition in `retry.fallback_on` moves to the next fallback at once;
- a condition in `retry.on` tries the same upstream again after backoff (an upstream
  `Retry-After` honoured up to `backoff.max`), then moves on;
- any other condition is final: an upstream's answer is relayed as sent, a connection
  failure becomes 502, a timeout 504.
When everything has failed, the client gets the most recent answer any upstream sent.

A protocol's client raises `UpstreamConnectError` itself, and lists in `broken` the exceptions
that mean a dropped exchange; the rest is translated here, once.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Mapping

from gateway.config.model import Backoff, Route
from gateway.engine.commit import AttemptFailed, HeldResponse, read_until_commit
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened
from gateway.errors import (
    GatewayError,
    NoHealthyUpstream,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamTimeout,
)
from gateway.observe.metrics import Metrics
from gateway.upstreams.pool import Endpoint, UpstreamPool

# ----------------------------------------------------------------- the retry loop


async def open_stream(
    ctx: RequestContext,
    route: Route,
    pools: Mapping[str, UpstreamPool],
    headers: dict,
    metrics: Metrics,
) -> Opened:
    policy = route.retry
    held: HeldResponse | None = None
    error: GatewayError | None = None
    retry_reason: str | None = None  # why the next try, if one happens, is a retry
    loop = asyncio.get_running_loop()
    for upstream, model in _hops(route):
        pool = pools[upstream]
        body = _with_model(ctx, model)
        tried: set[Endpoint] = set()
        for attempt in range(1, policy.attempts + 1):
            endpoint = pool.pick(tried)
            if endpoint is None:
                error = error or NoHealthyUpstream(
                    f"upstream {upstream!r} has no endpoint in rotation"
                )
                break
            if retry_reason is not None:  # a retry is a try that follows a failure
                metrics.child(metrics.retries, route.name, retry_reason).inc()
                ctx.trace.retry(retry_reason)
                retry_reason = None
            tried.add(endpoint)
            ctx.upstream, ctx.endpoint = upstream, endpoint.url
            ctx.attempts += 1
            span = ctx.trace.attempt(upstream, endpoint.url, headers)
            try:
                opened = await _try_once(ctx, route, pool, endpoint, body, headers)
            except AttemptFailed as failed:
                outcome = _attempt_outcome(failed)
                span.failed(outcome, failed.reason, failed.held.status if failed.held else None)
                metrics.child(metrics.upstream_attempts, upstream, outcome).inc()
                held = failed.held or held
                error = failed.error
                matched = _decide(failed.conditions, route)
                if matched is None:
                    return _final(failed)
                retry_reason = failed.reason
                if matched == "fallback" or attempt == policy.attempts:
                    break
                delay = backoff_delay(policy.backoff, attempt, failed.retry_after)
                if loop.time() + delay >= ctx.deadline:
                    break
                await asyncio.sleep(delay)
            else:
                span.answered(opened.status)
                outcome = "ok" if opened.status < 400 else "upstream_error"
                metrics.child(metrics.upstream_attempts, upstream, outcome).inc()
                return opened
        if loop.time() >= ctx.deadline:
            break
    if held is not None:
        return held.opened()
    raise error or NoHealthyUpstream("no upstream could be tried")


def _attempt_outcome(failed: AttemptFailed) -> str:
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


def _final(failed: AttemptFailed) -> Opened:
    if failed.held is not None:
        return failed.held.opened()
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
    headers: dict,
) -> Opened:
    t = route.timeouts
    loop = asyncio.get_running_loop()
    client = pool.client
    endpoint.outstanding += 1
    response = None
    try:
        # Until the connection is ready, connect and first_chunk share one bound; then the
        # request goes out and first_chunk counts from there.
        async with asyncio.timeout_at(
            min(loop.time() + t.connect + t.first_chunk, ctx.deadline)
        ) as scope:

            def request_sent() -> None:
                scope.reschedule(min(loop.time() + t.first_chunk, ctx.deadline))

            response = await client.send(
                ctx.method, endpoint.url + ctx.path, body, headers, t.connect, request_sent
            )
            opened = await read_until_commit(ctx, route, response)
    except BaseException as exc:
        if response is not None:
            response.close()
        endpoint.outstanding -= 1
        timeout_condition = (
            "total_timeout" if loop.time() >= ctx.deadline else "first_chunk_timeout"
        )
        failed = _translate(exc, timeout_condition, pool.name, client.broken)
        if failed is None:
            raise
        if failed.ejects:
            pool.record_failure(endpoint)
        raise failed from exc
    if opened.status >= 500:
        pool.record_failure(endpoint)
    elif opened.status < 400:
        pool.record_success(endpoint)
    opened.pool, opened.endpoint = pool, endpoint
    if opened.complete:
        opened.finish(clean=True)  # nothing more to read: the connection can be reused
    return opened


def _translate(
    exc: BaseException,
    timeout_condition: str,
    upstream: str,
    broken: tuple[type[BaseException], ...],
) -> AttemptFailed | None:
    """Where a try's exceptions become the gateway's conditions."""
    if isinstance(exc, AttemptFailed):
        return exc
    if isinstance(exc, GatewayError):  # raised by the protocol's client (connect errors)
        return AttemptFailed(exc, (exc.condition,))
    if isinstance(exc, TimeoutError):
        what = "first chunk" if timeout_condition == "first_chunk_timeout" else "total time"
        err = UpstreamTimeout(f"upstream {upstream!r} ran out of {what}", timeout_condition)
        return AttemptFailed(err, (timeout_condition,))
    if isinstance(exc, broken):
        err = UpstreamReset(f"upstream {upstream!r} dropped the connection: {exc}")
        return AttemptFailed(err, ("reset",))
    return None  # cancellation and programming errors pass through
