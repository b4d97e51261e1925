"""Run the chosen scenarios one after another, then write the report and print the table.

A scenario that fails is reported as failed and the others still run; Ctrl-C stops the run
(every child process is stopped on the way out) and nothing is written.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from . import plots, report
from .bench import Bench
from .proc_stats import wait_for_quiet
from .procs import REPO_ROOT, raise_fd_limit
from .progress import say
from .results_model import ScenarioResult
from .scenarios import SCENARIOS
from .sizes import Sizes


async def run(sizes: Sizes, keys: list[str], out_dir: Path, *, pin: bool, use_nginx: bool,
              command: str, gateway_source: Path | None = None) -> list[ScenarioResult]:
    fds = raise_fd_limit()
    started = time.monotonic()
    results: list[ScenarioResult] = []
    with tempfile.TemporaryDirectory(prefix="streamgate-bench-") as tmp:
        bench = Bench.create(sizes, Path(tmp), pin, use_nginx)
        bench.gateway_source = gateway_source
        if gateway_source is not None:  # in-process checks (Router.match) use it too
            sys.path.insert(0, str(gateway_source))
        say(f"streamgate load tests: {', '.join(keys)} (open files {fds}, layout "
            f"proxy {_cpus(bench.layout.proxy)} / load {_cpus(bench.layout.load)})")
        if not bench.with_nginx:
            say("  nginx is not installed or was turned off: no reference column")
        for key in keys:
            results.append(await _run_one(bench, key))
        meta = _meta(bench, command, time.monotonic() - started)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta["profiled"] = (out_dir / "profile" / "PROFILE.md").exists()
    images = plots.write(results, out_dir)
    path = report.write(results, images, meta, out_dir)
    print(report.console_table(results))
    say(f"report: {path} ({meta['seconds']:.0f} s)")
    return results


async def _run_one(bench: Bench, key: str) -> ScenarioResult:
    module = SCENARIOS[key]
    busy = await wait_for_quiet(bench.sizes.quiet_wait_s)
    say(f"▶ {module.TITLE} (machine {busy:.0%} busy before it)")
    started = time.monotonic()
    try:
        result = await module.run(bench)
    except Exception as exc:  # one broken scenario must not lose the others' numbers
        traceback.print_exc()
        result = ScenarioResult(key, module.TITLE, "", error=f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    result.notes.append(f"Before it started, the machine's cores were {busy:.0%} busy with other "
                        f"work (waited up to {bench.sizes.quiet_wait_s:g} s for under 25%).")
    return result


def _cpus(cpus: frozenset[int] | None) -> str:
    return ",".join(map(str, sorted(cpus))) if cpus else "any"


def _meta(bench: Bench, command: str, seconds: float) -> dict:
    return {
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seconds": seconds,
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}",
        "layout": f"proxy on core {_cpus(bench.layout.proxy)}, client + fake-llm + wrk on "
        f"core {_cpus(bench.layout.load)}",
        "python": sys.version.split()[0],
        "aiohttp": _version("aiohttp"),
        "uvloop": _version("uvloop"),
        "nginx": _tool_version(["nginx", "-v"]) if bench.with_nginx else "not used",
        "wrk": _tool_version(["wrk", "--version"]) if bench.with_wrk else "not installed",
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "gateway_source": str(bench.gateway_source or "this checkout"),
        "commit": _tool_version(["git", "-C", str(REPO_ROOT), "describe", "--always",
                                 "--dirty"]),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _tool_version(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "not installed"
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"
