"""How a failure before the commit point looks over HTTP: SPEC's JSON error body."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.errors import GatewayError, error_body
from gateway.protocols.http.headers import SERVER


def error_response(err: GatewayError, request_id: str) -> web.Response:
    """The JSON error response for a failure before the commit point."""
    headers = {"x-request-id": request_id, SERVER[0]: SERVER[1]}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(-(-err.retry_after // 1))))
    return web.Response(
        status=err.status,
        body=json.dumps(error_body(err, request_id)).encode(),
        content_type="application/json",
        headers=headers,
    )
