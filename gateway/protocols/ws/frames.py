"""Server-to-client WebSocket frames, built here so a message is one synchronous transport write
(the engine's `Sink.write` never waits); aiohttp's own writer is async per frame. Frames from a
server are never masked, and the session is accepted without compression, so a frame is just
a header and the payload."""

from __future__ import annotations

import struct

from aiohttp import WSMsgType

from gateway.engine import messages

_OPCODES = {messages.TEXT: WSMsgType.TEXT.value, messages.BINARY: WSMsgType.BINARY.value}


def frame(opcode: int, payload: bytes) -> bytes:
    first, size = 0x80 | opcode, len(payload)  # FIN: every message is one frame
    if size < 126:
        return bytes((first, size)) + payload
    if size < 1 << 16:
        return struct.pack(">BBH", first, 126, size) + payload
    return struct.pack(">BBQ", first, 127, size) + payload


def text(payload: bytes) -> bytes:
    return frame(WSMsgType.TEXT.value, payload)


def data_frame(kind: int, payload: bytes) -> bytes:
    return frame(_OPCODES[kind], payload)
