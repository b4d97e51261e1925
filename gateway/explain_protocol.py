"""`streamgate explain`'s line on how a route speaks to its client and upstream: the framing,
a WebSocket session, gRPC calls, or a bridge."""

from __future__ import annotations

from gateway.config.routes import AnswerEnd, FramingConfig, Route


def protocol_line(route: Route) -> str:
    bridge = route.websocket_upstream
    if route.websocket is not None:
        return _websocket_line(route)
    if route.grpc is not None:
        glob = f"method glob {route.grpc.method!r}; " if route.grpc.method != "*" else ""
        return (
            f"grpc: {glob}messages relayed as opaque bytes; commits at the first response "
            "message (initial metadata held until then); after it a failure ends the call "
            "with UNAVAILABLE or DEADLINE_EXCEEDED, never OK; the caller's deadline goes "
            "upstream shortened by the time spent"
        )
    if route.grpc_bridge is not None:
        return _grpc_bridge_line(route)
    if bridge is None:
        return _framing_line(route.framing)
    done = ", then data: [DONE]" if bridge.done_event else ""
    return (
        "bridged to a WebSocket upstream (dialled as ws://, wss://): the body is sent as the "
        "first message, each upstream message is one SSE data event; "
        f"{_answer_end(bridge.answer_end)} (or a 1000 close) ends it cleanly{done}; anything "
        f"else ends it with event: error; messages up to {bridge.max_message_size} bytes"
    )


def _grpc_bridge_line(route: Route) -> str:
    bridge = route.grpc_bridge
    source = bridge.descriptor_set or "the upstream's server reflection"
    each = "one SSE data event, then data: [DONE]" if bridge.output == "sse" else "one line"
    return (
        f"grpc bridge: the JSON body becomes {bridge.method}'s request (descriptors from "
        f"{source}); each response message is {each}; a status before the first message "
        "is answered as its HTTP status, after it "
        + ("an event: error" if bridge.output == "sse" else "the connection is aborted")
    )


def _websocket_line(route: Route) -> str:
    ws, t = route.websocket, route.timeouts
    if ws.upstream == "sse":
        end = "no end message" if ws.end_message is None else f"end message {ws.end_message!r}"
        how = (
            "websocket bridge to SSE: the first message is POSTed with stream: true, each "
            f"data event goes back as a text message; at the end {end} and close 1000"
        )
    else:
        gaps = (
            ""
            if ws.answer_end is None
            else f", its messages at most chunk_gap {t.chunk_gap:g}s apart until "
            f"{_answer_end(ws.answer_end)}"
        )
        how = (
            "websocket passthrough (upstream dialled as ws://, wss://): messages, close codes "
            f"and subprotocols relayed; an answer must start within first_chunk {t.first_chunk:g}s "
            f"of a client message{gaps}, idle {ws.idle:g}s otherwise; until the first upstream "
            f"message, client messages (up to {ws.replay_buffer} bytes) are replayed to the "
            "next try"
        )
    return (
        f"{how}; messages up to {ws.max_message_size} bytes (1009 past it); after the upgrade "
        "a failure closes with 1011 (1013 when overloaded), never 1000"
    )


def _answer_end(end: AnswerEnd) -> str:
    if end.kind == "finish_reason":
        return "a chunk with finish_reason set"
    return "a message with " + ", ".join(f"{k}={v!r}" for k, v in end.match.items())


def _framing_line(framing: FramingConfig) -> str:
    if framing.kind == "auto":
        return (
            "framing: auto (sse for text/event-stream, ndjson for application/x-ndjson, "
            "else raw for a stream and unary otherwise)"
        )
    footer = ", a missing footer is a truncation" if framing.require_footer else ""
    return f"framing: {framing.kind}{footer}"
