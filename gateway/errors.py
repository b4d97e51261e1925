"""The error tree: what every layer raises and every protocol renders in its own way.

Callers branch on attributes, never on message text:
- `status` is the HTTP status the client gets when the error happens before the commit point;
- `type` is the `error.type` in the JSON body;
- `condition` is the retry condition name (`connect_error`, `reset`, `first_chunk_timeout`, ...)
  matched against `retry.on` / `retry.fallback_on`, and used as the `kind`/`reason` label;
- `outcome` is the stream-duration outcome label it maps to (`rejected` for refusals before any
  upstream was tried; those are not streams).

Foreign exceptions (aiohttp, redis, OS errors) are translated into these at one boundary each
(each protocol's upstream client and `engine/attempts.py` for the upstream side, the
limiters for Redis). How an error looks on the wire is each protocol's (`protocols/`).
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    status = 502
    type = "upstream_error"
    condition = "upstream_error"
    outcome = "upstream_error"
    retry_after: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ----------------------------------------------------------------- the client's fault


class ClientError(GatewayError):
    """The request was refused before any upstream was tried."""

    outcome = "rejected"


class BadRequest(ClientError):
    status = 400
    type = "bad_request"
    condition = "bad_request"


class RequestTooLarge(ClientError):
    status = 413
    type = "request_too_large"
    condition = "request_too_large"


class NoRoute(ClientError):
    status = 404
    type = "no_route"
    condition = "no_route"


class HeadersTooLarge(ClientError):
    status = 431
    type = "headers_too_large"
    condition = "headers_too_large"


class RequestTimeout(ClientError):
    """The client took longer than `server.body_timeout` (or `header_timeout`) to send."""

    status = 408
    type = "request_timeout"
    condition = "request_timeout"


# ----------------------------------------------------------------- admission


class Rejected(ClientError):
    """Admission said no; carries a Retry-After in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(Rejected):
    status = 429
    type = "rate_limited"
    condition = "rate_limited"

    def __init__(self, message: str, retry_after: float, limit: str, rate: float) -> None:
        super().__init__(message, retry_after)
        self.limit = limit
        self.rate = rate


class Overloaded(Rejected):
    status = 503
    type = "overloaded"
    condition = "overloaded"


def queue_timed_out(limit: str, timeout: float) -> Overloaded:
    """A request waited its route's whole `timeouts.queue` for units of `limit`."""
    return Overloaded(
        f"waited {timeout:g}s for concurrency limit {limit!r}", retry_after=max(1.0, timeout)
    )


class StateUnavailable(ClientError):
    """Shared state (Redis) is unreachable and the policy is fail_closed."""

    status = 503
    type = "state_unavailable"
    condition = "state_unavailable"


class Draining(GatewayError):
    status = 503
    type = "shutting_down"
    condition = "shutdown"
    outcome = "shutdown"


# ----------------------------------------------------------------- upstream side


class NoHealthyUpstream(GatewayError):
    status = 503
    type = "no_healthy_upstream"
    condition = "no_healthy_upstream"


class UpstreamConnectError(GatewayError):
    status = 502
    type = "upstream_unavailable"
    condition = "connect_error"

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused
        """The connection was refused: no server process ever saw the request."""


class UpstreamReset(GatewayError):
    """The upstream dropped the connection (before or after the commit point)."""

    status = 502
    type = "upstream_reset"
    condition = "reset"


class UpstreamStatus(GatewayError):
    """The upstream answered with an error status (kept aside in case every try fails)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        self.condition = str(status)


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_timeout"
    outcome = "timeout"

    def __init__(self, message: str, condition: str) -> None:
        super().__init__(message)
        self.condition = condition  # first_chunk_timeout | chunk_gap_timeout | total_timeout


class ResumeDiverged(GatewayError):
    """A resumed stream's new answer does not begin with the text the client already has (or
    ends before covering it): it cannot be spliced on, so the stream ends visibly."""

    status = 502
    type = "resume_diverged"
    condition = "resume_diverged"


class SlowClient(GatewayError):
    status = 504
    type = "slow_client"
    condition = "slow_client"
    outcome = "slow_client"


class TokenCapExceeded(GatewayError):
    """A stream produced more than its token budget's `max_tokens_per_stream`: the gateway
    ended it (after the commit point, so only ever as a visible end, never a status)."""

    status = 429
    type = "token_cap_exceeded"
    condition = "token_cap_exceeded"
    outcome = "token_cap_exceeded"


class PoolExhausted(GatewayError):
    """Every one of an upstream's `max_connections` stayed busy for the route's `timeouts.queue`:
    the request waited for the gateway's own capacity, not for a slow backend."""

    status = 503
    type = "pool_exhausted"
    condition = "pool_exhausted"
    outcome = "rejected"

    def __init__(self, upstream: str, limit: int, waited: float) -> None:
        super().__init__(
            f"all {limit} connections to upstream {upstream!r} stayed busy for {waited:g}s"
        )
        self.retry_after = max(1.0, waited)


# ----------------------------------------------------------------- the gateway's own fault


class InternalError(GatewayError):
    """An exception nobody translated: a bug of ours. Still answered as JSON and logged true;
    500, not 502, because the operator must look at the gateway, not at a backend."""

    status = 500
    type = "internal_error"
    condition = "internal_error"
    outcome = "internal_error"


# ----------------------------------------------------------------- the body every protocol shows


def error_body(err: GatewayError, request_id: str) -> dict:
    return {"error": {"type": err.type, "message": err.message, "request_id": request_id}}


# ----------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One problem in a config file, positioned at the offending value (or key)."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return printable(f"{self.file}:{self.line}:{self.column}: {where}{self.message}")


def printable(text: str) -> str:
    """`text` on one line that any terminal can print: control characters, line separators and
    lone surrogates (a YAML "\\ud800" escape) are written as escapes, like repr() does."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigErrors(Exception):
    """A config that failed to load; carries every error found, in file order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = sorted(errors, key=lambda e: (e.file, e.line, e.column))
        super().__init__("\n".join(str(e) for e in self.errors))
