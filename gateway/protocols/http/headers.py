"""Header rules at the two boundaries: client → upstream, and upstream → client.

Hop-by-hop headers (RFC 9110 7.6.1) describe one connection, not the message, so they are
dropped both ways, together with any header the `Connection` header names. Framing headers
(Content-Length, Transfer-Encoding) are the gateway's to set on each side.
"""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Also never forwarded to the upstream: the gateway sets these itself.
_NOT_FORWARDED_UP = HOP_BY_HOP | {"host", "content-length", "expect"}
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {"content-length", "x-request-id", "server"}

SSE_HEADERS = (("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"))
SERVER = ("Server", "streamgate")
"""On every response, replacing the upstream's and aiohttp's own (which names versions)."""


def _connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("connection", ()):
        named.update(token.strip().lower() for token in value.split(","))
    return named


def _filtered(headers: CIMultiDictProxy[str], dropped: frozenset[str]) -> CIMultiDict[str]:
    if "connection" in headers:  # the names it lists are hop-by-hop too
        named = _connection_named(headers)
        if not named <= dropped:  # most say only keep-alive or close
            dropped = dropped | named
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in dropped])


def upstream_request_headers(
    client: CIMultiDictProxy[str],
    request_id: str,
    client_ip: str,
    scheme: str,
) -> CIMultiDict[str]:
    out = _filtered(client, _NOT_FORWARDED_UP)
    out["x-request-id"] = request_id
    forwarded_for = client.get("x-forwarded-for")
    out["X-Forwarded-For"] = f"{forwarded_for}, {client_ip}" if forwarded_for else client_ip
    out.setdefault("X-Forwarded-Proto", scheme)
    return out


def client_response_headers(
    upstream: CIMultiDictProxy[str], request_id: str, sse: bool
) -> CIMultiDict[str]:
    out = _filtered(upstream, _NOT_FORWARDED_DOWN)
    out["x-request-id"] = request_id
    out[SERVER[0]] = SERVER[1]
    if sse:
        for name, value in SSE_HEADERS:
            out[name] = value
    return out


def add_rate_limit_headers(
    headers,
    rate_remaining: tuple[int, int] | None,
    token_budget: tuple[int, int, float] | None = None,
) -> None:
    """x-ratelimit-limit / x-ratelimit-remaining, where a rate limit applied; and, where a
    token budget applied, the -tokens trio the well-known hosted APIs send (reset as seconds
    with an `s`, the time until the budget is full again)."""
    if rate_remaining is not None:
        headers["x-ratelimit-limit"] = str(rate_remaining[0])
        headers["x-ratelimit-remaining"] = str(rate_remaining[1])
    if token_budget is not None:
        headers["x-ratelimit-limit-tokens"] = str(token_budget[0])
        headers["x-ratelimit-remaining-tokens"] = str(token_budget[1])
        headers["x-ratelimit-reset-tokens"] = f"{round(token_budget[2], 3):g}s"
