"""One JSON line per request on stderr. Secrets never appear: no headers are logged."""

from __future__ import annotations

import json
import sys

from gateway.observe.request import ObservedRequest


class AccessLog:
    def __init__(self, enabled: bool, stream=None) -> None:
        self.enabled = enabled
        self._stream = stream or sys.stderr

    def write(self, ctx: ObservedRequest) -> None:
        if not self.enabled:
            return
        now = ctx.loop.time()
        ttfc = ctx.first_chunk_at - ctx.started if ctx.first_chunk_at is not None else None
        record = {
            "request_id": ctx.request_id,
            "method": ctx.method,
            "path": ctx.path.split("?", 1)[0],
            "route": ctx.route_name or None,
            "upstream": ctx.upstream,
            "endpoint": ctx.endpoint,
            "attempts": ctx.attempts,
            "tries": [
                {"upstream": t.upstream, "endpoint": t.url, "why": t.why, "reason": t.reason,
                 "result": t.result}
                for t in ctx.tries
            ],
            "resumes": ctx.resumes,
            "status": ctx.status,
            "stream": ctx.stream,
            "model": ctx.model,
            "time_to_first_chunk_s": round(ttfc, 6) if ttfc is not None else None,
            "duration_s": round(now - ctx.started, 6),
            "chunks": ctx.chunks,
            "bytes": ctx.bytes,
            "protocol": ctx.protocol,
            "messages_in": ctx.messages_in,
            "outcome": ctx.outcome,
            "error": ctx.error_kind,
        }
        self._stream.write(json.dumps(record) + "\n")
