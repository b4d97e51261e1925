"""`python -m loadtests --instructions`: the gateway's own CPU work per chunk and per stream,
counted in instructions by valgrind's callgrind, so that a before/after comparison holds on a
machine shared with other jobs (wall-clock CPU there moves with cache and scheduler noise).

The gateway runs under callgrind (tens of times slower), with the paced load slowed to match:
`STREAMS` streams, `CONCURRENCY` at a time, one chunk every `INTERVAL_S`, so that every chunk
still arrives on its own read. Two loads differ only in their length (`SHORT` and `LONG`
content tokens); the counters are zeroed before and dumped after each. Then
    per chunk  = (I_long - I_short) / (events_long - events_short)
    per stream = I_short / streams - per chunk x events per short stream
Only user-space instructions are counted: the kernel's share (the socket calls, the same for
any proxy that relays a chunk per read) is not, and neither is time. Run it for two checkouts
(`--gateway-src DIR`) and compare.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .bench import Bench
from .gateway_config import gateway_yaml
from .procs import REPO_ROOT
from .progress import say
from .sizes import Sizes
from .targets import GATEWAY_ANNOUNCE, Target

STREAMS = 24
CONCURRENCY = 8
INTERVAL_S = 0.05
SHORT, LONG = 4, 36
_TOTALS = re.compile(rb"^(?:totals|summary):\s*(\d+)", re.MULTILINE)


async def instructions(sizes: Sizes, gateway_source: Path | None = None) -> int:
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    if valgrind is None or control is None:
        say("valgrind (with callgrind_control) is not installed: apt-get install valgrind")
        return 1
    with tempfile.TemporaryDirectory(prefix="streamgate-callgrind-") as tmp:
        workdir = Path(tmp)
        bench = Bench.create(sizes, workdir, pin=False, use_nginx=False)
        async with bench.processes():
            upstream = await bench.upstream()
            config = workdir / "gateway.yaml"
            config.write_text(gateway_yaml(upstream.url))
            argv = [valgrind, "--tool=callgrind", f"--callgrind-out-file={workdir}/cg.out",
                    sys.executable, "-m", "gateway", "serve", "--config", str(config)]
            child = await bench.group.spawn("gateway-callgrind", argv, announce=GATEWAY_ANNOUNCE,
                                            start_timeout_s=900, cwd=gateway_source or REPO_ROOT)
            port = int(child.url.rsplit(":", 1)[1])
            gateway = Target("gateway", port, child)
            for tokens in (SHORT, LONG):  # every path once (lazy imports, caches) uncounted
                await _load(bench, gateway, tokens, "warm-up")
            counted = []
            for tokens in (SHORT, LONG):
                await _control(control, "--zero", child.pid)
                events = await _load(bench, gateway, tokens, f"{tokens} tokens")
                counted.append((await _dump(control, child.pid, workdir), events))
    (i_short, e_short), (i_long, e_long) = counted
    per_chunk = (i_long - i_short) / (e_long - e_short)
    per_stream = i_short / STREAMS - per_chunk * e_short / STREAMS
    source = gateway_source or REPO_ROOT
    print(f"gateway from {source}: {per_chunk:,.0f} instructions per relayed chunk, "
          f"{per_stream:,.0f} per stream (request path, commit and end); "
          f"{STREAMS} streams of {SHORT} and {LONG} tokens, {CONCURRENCY} at a time, "
          f"one chunk every {INTERVAL_S * 1000:g} ms, under callgrind")
    return 0


async def _load(bench: Bench, gateway: Target, tokens: int, label: str) -> int:
    fake = {"tokens": tokens, "tokens_per_s": 1 / INTERVAL_S}
    tally = await bench.load(f"callgrind {label} → gateway", gateway, fake, CONCURRENCY,
                             STREAMS, stagger_s=tokens * INTERVAL_S)
    if tally.errors or tally.ok != STREAMS:
        raise RuntimeError(f"{label}: {tally.ok} of {STREAMS} streams completed")
    return tally.events


async def _control(control: str, flag: str, pid: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        control, flag, str(pid), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    async with asyncio.timeout(120):
        await proc.wait()


async def _dump(control: str, pid: int, workdir: Path) -> int:
    """Dump the counters since the last zero: their total instruction count."""
    before = set(workdir.glob("cg.out*"))
    await _control(control, "--dump", pid)
    for _ in range(600):
        new = set(workdir.glob("cg.out*")) - before
        found = [int(m.group(1)) for p in new if (m := _TOTALS.search(p.read_bytes()))]
        if found:
            return found[0]
        await asyncio.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")
