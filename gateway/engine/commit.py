"""Reading an upstream answer up to the commit point, and judging what was read.

An error status is read whole (bounded) so its body can be matched against `retry.on` and
kept aside. A success is read until its framing says a frame carries content (a stream), or to
its end (a unary answer). A 200 that ends with nothing to say (to any method but HEAD) is the
condition `empty_body`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from gateway.config.routes import Route
from gateway.engine.context import RequestContext
from gateway.engine.exchange import Opened, UpstreamResponse
from gateway.engine.framing import Framing, choose
from gateway.errors import (
    GatewayError,
    PoolExhausted,
    UpstreamConnectError,
    UpstreamReset,
    UpstreamStatus,
    UpstreamTimeout,
)

ERROR_BODY_LIMIT = 256 * 1024
"""An upstream error body larger than this is relayed as a stream, not inspected."""


@dataclass(slots=True)
class HeldResponse:
    """A complete upstream answer kept aside: the client gets it if every later try fails."""

    status: int
    headers: object
    body: bytes

    def opened(self) -> Opened:
        return Opened(self.status, self.headers, self.body, complete=True)


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

    @property
    def outcome(self) -> str:
        """The `outcome` label of `streamgate_upstream_attempts_total`."""
        if isinstance(self.error, PoolExhausted):
            return "pool_exhausted"
        if isinstance(self.error, UpstreamTimeout):
            return "timeout"
        if isinstance(self.error, UpstreamConnectError):
            return "connect_error"
        return "upstream_error"


async def read_until_commit(
    ctx: RequestContext, route: Route, response: UpstreamResponse
) -> Opened:
    status, headers = response.status, response.headers
    limit = route.buffer.bytes
    if status >= 400:
        body, complete = await _read_whole(response, ERROR_BODY_LIMIT)
        if complete:
            raise _status_failure(status, headers, body, response.conditions)
        return Opened(status, headers, body, False, Framing(), response)
    framing = response.framing or choose(route.framing, headers, ctx.stream)
    if framing.streams:
        head, complete = await _read_to_commit(response, framing, limit)
        has_content = not complete or framing.commits_at_end(head)
    else:
        head, complete = await _read_whole(response, limit)
        has_content = bool(head) or not complete
        framing = Framing()  # a body past the buffer goes on as raw bytes
    if status == 200 and not has_content and ctx.method != "HEAD":  # HEAD: none is due
        held = HeldResponse(status, headers, head)
        err = UpstreamReset(f"upstream sent a 200 with no content ({len(head)} bytes)")
        raise AttemptFailed(err, ("empty_body",), held=held, ejects=False)
    return Opened(status, headers, head, complete, framing, response)


async def _read_whole(response: UpstreamResponse, limit: int) -> tuple[bytes, bool]:
    """Read the body to its end, or stop past `limit` bytes: (bytes, whether it ended)."""
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        data = await response.read()
        if not data:
            return b"".join(parts), True
        parts.append(data)
        size += len(data)
    return b"".join(parts), False


async def _read_to_commit(
    response: UpstreamResponse, framing: Framing, limit: int
) -> tuple[bytes, bool]:
    """Read until a complete frame commits (or past `limit`): (bytes, whether it ended)."""
    held = b""
    judged = 0  # complete frames before this offset have been judged: none commits
    while len(held) <= limit:
        data = await response.read()
        if not data:
            return held, True
        held += data
        end = judged + framing.cut(held[judged:] if judged else held)
        if end > judged:
            if framing.commits(held[judged:end]):
                return held, False
            judged = end
    return held, False


def _status_failure(
    status: int, headers, body: bytes, names: tuple[str, ...]
) -> AttemptFailed:
    codes = _error_codes(body)
    held = HeldResponse(status, headers, body)
    said = f"{names[0]} ({status})" if names else str(status)
    err = UpstreamStatus(f"upstream answered {said}", status)
    return AttemptFailed(
        err,
        (*names, str(status), *codes),
        held=held,
        retry_after=_retry_after(headers.get("retry-after")),
        ejects=status >= 500,
    )


def _error_codes(body: bytes) -> tuple[str, ...]:
    """Error codes an OpenAI-style (or vLLM-style) JSON error body names."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than worth reading
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
