"""How the fake fails: OpenAI-style error answers, injected statuses, stalls and TCP resets."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct

from aiohttp import web

from .knobs import Knobs
from .stats import Stats

_RESET_FLUSH_BOUND_S = 1.0
_SIOCOUTQNSD = 0x894B  # Linux: bytes in the socket's send queue not yet sent
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_response(
    status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """An OpenAI-style error: `{"error": {"message", "type", "param", "code"}}`."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": message, "type": kind, "param": None, "code": code}
    return web.json_response({"error": error}, status=status, headers=headers)


def injected_failure(knobs: Knobs) -> web.Response:
    """The `fail_status` answer, with `error_code` and `Retry-After` when the knobs ask."""
    headers = {} if knobs.retry_after is None else {"Retry-After": str(knobs.retry_after)}
    status = knobs.fail_status or 500
    message = f"fake-llm: injected failure (status {status})"
    return error_response(status, message, code=knobs.error_code, headers=headers)


def prefill_refused() -> web.Response:
    """A backend that cannot continue a final assistant message says so with a 400."""
    message = "fake-llm: the last message must not be the assistant's (no prefill)"
    return error_response(400, message, code="prefill_unsupported")


async def inject(
    fault: str, request: web.Request, response: web.StreamResponse | None, stats: Stats
) -> web.StreamResponse:
    """A "stall" (silence until the client leaves), a "cut" (a clean end, no finish and no
    [DONE]: the body simply stops) or a "reset" (a TCP RST)."""
    if fault == "cut":
        stats.cuts_injected += 1
        if response is not None and response.prepared and response.content_length is None:
            await response.write_eof()
        elif request.transport is not None:
            request.transport.close()  # a unary body shorter than its Content-Length
        return response or web.Response()
    if fault == "stall":
        stats.stalls_injected += 1
        await asyncio.Future()  # until the client leaves and the handler is cancelled
    stats.resets_injected += 1
    transport = request.transport
    if transport is not None:
        await _sent(transport)
        sock = transport.get_extra_info("socket")
        # SO_LINGER (on, 0 s): close() sends an RST instead of a FIN, as a crashed backend would
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp's final write_eof meets the closed transport and gives up quietly
    return response or web.Response()


async def _sent(transport: asyncio.Transport) -> None:
    """Wait, bounded, until every byte written has left this host: an RST discards the unsent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _RESET_FLUSH_BOUND_S
    fd = transport.get_extra_info("socket").fileno()
    while loop.time() < deadline:
        if not transport.get_write_buffer_size() and not _unsent_bytes(fd):
            return
        await asyncio.sleep(0.001)


def _unsent_bytes(fd: int) -> int:
    try:
        return struct.unpack("i", fcntl.ioctl(fd, _SIOCOUTQNSD, b"\0\0\0\0"))[0]
    except OSError:  # not Linux: the transport buffer is all we can see
        return 0
