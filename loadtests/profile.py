"""`python -m loadtests --profile`: where the gateway spends its CPU under load, by py-spy.

The gateway is driven with the paced load (CPU per chunk) and then with unpaced short
streams (per-stream cost), each while `py-spy record` samples it at 200 Hz (Python frames
only: time inside C, uvloop's loop and syscalls included, shows as `self` of the Python
function that called it, or of `Runner.run` for the loop itself). The collapsed stacks are
kept (`*.txt`, for speedscope or flamegraph.pl), a flame graph is drawn for each, and the
hottest functions are tabulated:
`self` = samples with the function on top of the stack, `total` = samples with it anywhere.
Profiled runs are slower than measured ones: never mix their numbers with the report's.
"""

from __future__ import annotations

import asyncio
import collections
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from .bench import Bench
from .progress import say
from .sizes import Sizes

TOP = 20


async def profile(sizes: Sizes, out_dir: Path, pin: bool,
                  gateway_source: Path | None = None) -> int:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        say("py-spy is not installed: pip install py-spy")
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamgate-profile-") as tmp:
        bench = Bench.create(sizes, Path(tmp), pin, use_nginx=False)
        bench.gateway_source = gateway_source
        s = sizes
        loads = {
            "paced": ({"tokens": s.paced_chunks, "tokens_per_s": 1 / s.paced_interval_s},
                      s.paced_streams, s.paced_streams * s.paced_repeats),
            "unpaced": ({"tokens": s.rate_tokens}, 64, 64 * 150),
        }
        sections = []
        async with bench.processes():
            upstream = await bench.upstream()
            gateway = await bench.gateway(upstream)
            for name, (fake, concurrency, streams) in loads.items():
                for fmt in ("raw", "flamegraph"):
                    path = out_dir / f"gateway-{name}.{'txt' if fmt == 'raw' else 'svg'}"
                    argv = [spy, "record", "--pid", str(gateway.pid),
                            "--rate", "200", "--format", fmt, "--output", str(path)]
                    spy_child = await bench.group.spawn("py-spy", argv, announce=None)
                    await asyncio.sleep(0.5)  # attached before the load starts
                    await bench.load(f"{name} ({fmt}) → gateway", gateway, fake, concurrency,
                                     streams)
                    spy_child.proc.send_signal(signal.SIGINT)  # py-spy writes its output, exits
                    async with asyncio.timeout(30):
                        await spy_child.proc.wait()
                    await bench.group.stop(spy_child)
                    if not path.exists():
                        raise RuntimeError(f"py-spy wrote no {path.name}:{spy_child.tail()}")
                sections.append((name, top_functions(out_dir / f"gateway-{name}.txt")))
    (out_dir / "PROFILE.md").write_text(_markdown(sections))
    print((out_dir / "PROFILE.md").read_text())
    return 0


def top_functions(collapsed: Path) -> tuple[int, list[tuple[str, float, float]],
                                             list[tuple[str, float, float]]]:
    """(samples, hottest by self, gateway's own functions by total): rows of
    (function, self %, total %), from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            anywhere[frame] += n
    if not samples:
        return 0, [], []

    def row(f: str) -> tuple[str, float, float]:
        return f, 100 * own[f] / samples, 100 * anywhere[f] / samples

    # the entry points (everything is under them) say nothing
    ours = [f for f, n in anywhere.most_common() if "(gateway/" in f and n < samples][:TOP]
    return samples, [row(f) for f, _ in own.most_common(TOP)], [row(f) for f in ours]


def _short(frame: str) -> str:
    # "relay (gateway/relay.py:197)" → "relay (gateway/relay.py)": lines split one function
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})" if path else name


def _markdown(sections) -> str:
    out = ["# Gateway profile under load (py-spy)", "",
           "Regenerate: `python -m loadtests --profile`. `self`: on top of the stack; "
           "`total`: anywhere in it; % of samples with the gateway busy (idle excluded).", ""]
    for name, (samples, hottest, ours) in sections:
        out += [f"## {name} load ({samples:,} samples)", "",
                f"![flame graph](gateway-{name}.svg)", ""]
        for title, rows in (("hottest functions", hottest),
                            ("the gateway's own functions, by total", ours)):
            out += [f"### {title}", "", "| function | self % | total % |", "|---|---:|---:|"]
            out += [f"| `{f}` | {own:.1f} | {total:.1f} |" for f, own, total in rows]
            out.append("")
    return "\n".join(out)
