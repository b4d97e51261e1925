"""Raw-socket HTTP/1.1 for tests that send what no HTTP client library would.

    answer = await exchange(gw.url, b"GET /../x HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    assert answer.status == 400 and answer.json()["error"]["request_id"]

Every wait is bounded; `exchange` reads one response (Content-Length framed, as all the
gateway's own answers are) and reports whether the server closed the connection after it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict


@dataclass
class RawAnswer:
    status_line: str
    headers: CIMultiDict[str]
    body: bytes
    closed: bool
    """The server closed the connection after this response."""

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ", 2)[1])

    def json(self) -> Any:
        return json.loads(self.body)


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    return await asyncio.open_connection(parts.hostname, parts.port, limit=1 << 20)


async def read_answer(reader: asyncio.StreamReader, timeout: float = 5) -> RawAnswer:
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        body = await reader.readexactly(int(headers.get("Content-Length", "0")))
        closed = headers.get("Connection", "").lower() == "close"
        if closed:
            closed = await reader.read(1) == b""
    return RawAnswer(status_line, headers, body, closed)


async def exchange(url: str, data: bytes, timeout: float = 5) -> RawAnswer:
    """Send `data` on a new connection and read one response."""
    reader, writer = await connect(url)
    try:
        writer.write(data)
        return await read_answer(reader, timeout)
    finally:
        writer.close()


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes; fails if it has not closed by `timeout`."""
    async with asyncio.timeout(timeout):
        return await reader.read(-1)


def request(method: str, target: str, body: bytes = b"", headers: str = "") -> bytes:
    return (
        f"{method} {target} HTTP/1.1\r\nHost: gw\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
