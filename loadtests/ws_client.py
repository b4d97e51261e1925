"""The WebSocket side of the load: aiohttp's client, speaking fake-llm's Inferneo-style
endpoint (directly, or through the gateway's passthrough route): a JSON request per message,
answered with one OpenAI chunk per message until `finish_reason` is set.

Each session asks for `repeats` paced completions in turn, as the SSE load runs `repeats`
streams per kept-alive connection, and counts the messages that come back. It is costlier per
message than the raw SSE client (`client.py`), but it runs on the load core: the scenario
measures the proxy's CPU, not this.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from . import client

FINISHED = '"finish_reason":"'  # a set finish_reason: token chunks carry `null`
CONTENT = '"delta":{"content"'
PATH = "/v1/chat/completions"


def request_text(fake: dict) -> str:
    return json.dumps({
        "model": "bench", "fake": fake,
        "messages": [{"role": "user", "content": "Tell me about load tests."}],
    }, separators=(",", ":"))


def url_of(host: str, port: int) -> str:
    return f"ws://{host}:{port}{PATH}"


@dataclass
class WsTally:
    messages: int = 0
    answers: int = 0
    errors: int = 0


async def run_sessions(url: str, fake: dict, sessions: int, repeats: int, stagger_s: float,
                       timeout_s: float, tick: Callable[[], None]) -> WsTally:
    """`sessions` concurrent sessions, started over `stagger_s`, each `repeats` answers."""
    tally, request = WsTally(), request_text(fake)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(i: int) -> None:
            await asyncio.sleep(stagger_s * i / sessions)
            try:
                async with http.ws_connect(url, max_msg_size=0) as ws:
                    for _ in range(repeats):
                        await ws.send_str(request)
                        await _answer(ws, tally)
                        tick()
            except (aiohttp.ClientError, ConnectionError):
                tally.errors += 1

        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(one(i) for i in range(sessions)))
    return tally


async def _answer(ws: aiohttp.ClientWebSocketResponse, tally: WsTally) -> None:
    while True:
        msg = await ws.receive()
        if msg.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"session ended mid-answer ({msg.type.name})")
        tally.messages += 1
        if FINISHED in msg.data:
            tally.answers += 1
            return


def hang_up_with(http: aiohttp.ClientSession, fake: dict):
    """A `disconnect.HangUp` over WebSocket: a paced answer, then FIN mid-answer."""

    async def hang_up(target, stats) -> tuple[float, int]:
        ws = await http.ws_connect(url_of(target.host, target.port))
        try:
            await ws.send_str(request_text(fake))
            async with asyncio.timeout(10):
                while CONTENT not in ((await ws.receive()).data or ""):
                    pass
            await asyncio.sleep(0.03)  # mid-answer, not at the first chunk
            before = (await stats())["client_gone"]
            # aiohttp keeps the upgraded connection's transport on its frame writer
            return client.shut_down(ws._writer.transport), before
        finally:
            ws._response.close()

    return hang_up
