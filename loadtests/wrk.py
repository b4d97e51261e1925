"""wrk (Debian's package) as the compiled load generator, driven by a generated Lua script.

The script POSTs the streaming chat request and, when wrk is done, prints one JSON line
(`WRKJSON {...}`) with the counts and latency percentiles, which is all that is parsed.
wrk runs for a fixed duration, with its own process timeout on top.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .client import chat_request
from .progress import Progress

_LUA = """\
wrk.method = "POST"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "text/event-stream"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class WrkReport:
    requests: int
    seconds: float
    errors: int
    p50_s: float
    p99_s: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def available() -> bool:
    return shutil.which("wrk") is not None


def script(fake: dict, workdir: Path) -> Path:
    body = chat_request("x", 0, fake).split(b"\r\n\r\n", 1)[1].decode()
    path = workdir / f"wrk-{abs(hash(body))}.lua"
    path.write_text(_LUA.format(body=json.dumps(body)))  # a JSON string is a Lua string
    return path


async def run(bench, target, connections: int, duration_s: float, fake: dict) -> WrkReport:
    """wrk -t1 -c`connections` for `duration_s` against `target` (on the load cores)."""
    lua = script(fake, bench.workdir)
    url = f"http://{target.host}:{target.port}/v1/chat/completions"
    seconds = max(1, round(duration_s))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(lua), url]
    label = f"wrk -c{connections} → {target.name}"
    async with Progress(label, seconds, "s") as progress:
        child = await bench.group.spawn("wrk", argv, cpus=bench.layout.load, announce=None)
        try:
            async with asyncio.timeout(seconds + 20):
                while child.proc.returncode is None:
                    await asyncio.sleep(0.25)
                    progress.done = min(seconds, progress.done + 0.25)
                await child.stop()
        finally:
            await bench.group.stop(child)
    for line in child.stdout_lines:
        if line.startswith("WRKJSON "):
            d = json.loads(line[len("WRKJSON "):])
            errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
            return WrkReport(d["requests"], d["duration_us"] / 1e6, errors,
                             d["p50_us"] / 1e6, d["p99_us"] / 1e6)
    raise RuntimeError(f"{label}: no summary from wrk:{child.tail()}")
