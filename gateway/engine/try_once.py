"""One try on one endpoint: a connection slot, the request, the answer read to its commit point.

The try's exceptions become the gateway's conditions here, once for every protocol: a
protocol's client raises `UpstreamConnectError` itself and lists in `broken` the exceptions
that mean a dropped exchange (`reset`); a timeout is `first_chunk_timeout`, or `total_timeout`
when the request's own budget ran out. What counts toward ejection is decided here too
(see EjectConfig): never the request's own total budget, a pool wait, or a dead idle connection.
"""

from __future__ import annotations

from gateway.config.routes import Route
from gateway.engine.commit import AttemptFailed, read_until_commit
from gateway.engine.context import RequestContext
from gateway.engine.deadline import Deadline
from gateway.engine.exchange import Opened
from gateway.errors import GatewayError, PoolExhausted, UpstreamReset, UpstreamTimeout
from gateway.upstreams.endpoint import Endpoint
from gateway.upstreams.pool import UpstreamPool


async def try_once(
    ctx: RequestContext,
    route: Route,
    pool: UpstreamPool,
    endpoint: Endpoint,
    body: bytes,
    model: str | None,
    headers: dict,
) -> Opened:
    t = route.timeouts
    loop = ctx.loop
    try:
        await pool.acquire(endpoint, max(0.0, min(t.queue, ctx.deadline - loop.time())))
    except PoolExhausted as exc:
        condition = ("pool_exhausted",)
        raise AttemptFailed(exc, condition, retry_after=exc.retry_after, ejects=False) from None
    client = pool.clients[ctx.upstream_protocol]
    session = ctx.session
    response = None
    reused = attached = asking = False
    try:
        # Until the connection is ready, connect and first_chunk share one bound; then the
        # request goes out and first_chunk counts from there.
        first_bound = min(loop.time() + t.connect + t.first_chunk, ctx.deadline)
        async with Deadline(loop, first_bound) as scope:

            def request_sent(on_reused_connection: bool) -> None:
                nonlocal reused
                reused = on_reused_connection
                scope.reschedule(min(loop.time() + t.first_chunk, ctx.deadline))

            def asked() -> None:
                nonlocal asking
                if asking:  # a session's first message to this upstream: its answer is due
                    asking = False
                    scope.reschedule(min(loop.time() + t.first_chunk, ctx.deadline))

            response = await client.send(
                ctx.method,
                endpoint.url + ctx.path,
                body,
                headers,
                t.connect,
                request_sent,
                deadline=ctx.deadline,
            )
            if session is not None and response.send is not None:
                # A session rests until asked: idle bounds the wait for its first message.
                attached = asking = True
                scope.reschedule(min(loop.time() + route.websocket.idle, ctx.deadline))
                await session.attach(response, response.headers, asked)
            opened = await read_until_commit(ctx, route, response)
            asking = False
    except BaseException as exc:
        if attached:
            session.detach()
        if response is not None:
            response.close()
        pool.release(endpoint)
        if loop.time() >= ctx.deadline:
            timeout_condition = "total_timeout"
        elif attached and not session.asked:
            timeout_condition = "idle_timeout"  # the client asked nothing: not a failure
        else:
            timeout_condition = "first_chunk_timeout"
        failed = _translate(exc, timeout_condition, pool.name, client.broken)
        if failed is None:
            raise
        if reused and response is None and failed.reason == "reset":
            # A keep-alive connection that died while idle: the endpoint's other idle ones
            # may have too, so the next try gets a fresh connection.
            failed.free, failed.ejects = True, False
            client.drop_idle(endpoint)
        if failed.ejects:
            pool.record_failure(endpoint, model)
        raise failed from exc
    if opened.status >= 500:
        pool.record_failure(endpoint, model)
    elif opened.status < 400:
        pool.record_success(endpoint, model)
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
    if isinstance(exc, AttemptFailed):
        return exc
    if isinstance(exc, GatewayError):  # raised by the protocol's client (connect errors)
        return AttemptFailed(exc, (exc.condition,), free=getattr(exc, "refused", False))
    if isinstance(exc, TimeoutError):
        if timeout_condition == "idle_timeout":
            err = UpstreamTimeout("session idle: its client asked nothing", timeout_condition)
        else:
            what = "first chunk" if timeout_condition == "first_chunk_timeout" else "total time"
            err = UpstreamTimeout(f"upstream {upstream!r} ran out of {what}", timeout_condition)
        # The request's own total budget, or a client that asks nothing, is not the endpoint's
        # fault.
        ejects = timeout_condition == "first_chunk_timeout"
        return AttemptFailed(err, (timeout_condition,), ejects=ejects)
    if isinstance(exc, broken):
        err = UpstreamReset(f"upstream {upstream!r} dropped the connection: {exc}")
        return AttemptFailed(err, ("reset",))
    return None  # cancellation and programming errors pass through
