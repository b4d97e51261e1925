"""`python -m loadtests`: run the standard load test set (or --quick) and write the report.

    python -m loadtests                    # the standard set → loadtests/results/
    python -m loadtests --quick            # tiny sizes, under a minute → a temp dir
    python -m loadtests --only ttfc disconnect
    python -m loadtests --profile          # py-spy profile of the gateway under load
    python -m loadtests --instructions     # instructions per chunk and per stream (callgrind)
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from .procs import REPO_ROOT
from .scenarios import SCENARIOS
from .sizes import QUICK, STANDARD

RESULTS = REPO_ROOT / "loadtests" / "results"
T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests",
        description="Load tests: streamgate vs a direct connection vs nginx, on 127.0.0.1.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (a smoke test, under a minute)")
    parser.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="SCENARIO",
                        help=f"run only these: {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path,
                        help=f"report directory (default {RESULTS.relative_to(REPO_ROOT)}, "
                        "or a temp dir with --quick)")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the proxy and the load to separate cores")
    parser.add_argument("--no-nginx", action="store_true", help="leave out the nginx reference")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a goal is missed or a scenario failed")
    parser.add_argument("--gateway-src", type=Path, metavar="DIR",
                        help="run the gateway from another checkout (e.g. `git archive` of a "
                        "baseline commit), to compare before and after a change")
    parser.add_argument("--profile", action="store_true",
                        help="instead: profile the gateway with py-spy under load")
    parser.add_argument("--instructions", action="store_true",
                        help="instead: count the gateway's instructions per chunk and per "
                        "stream under valgrind's callgrind (independent of the machine's load)")
    return parser


async def _stoppable(work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; SIGINT or SIGTERM cancels it, so every child process is stopped on the way
    out. (Set here, not left to asyncio: a shell's background job inherits SIGINT ignored.)"""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await work
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else STANDARD
    out = args.out or (Path(tempfile.mkdtemp(prefix="streamgate-quick-")) if args.quick
                       else RESULTS)
    command = "python -m loadtests " + shlex.join(argv if argv is not None else sys.argv[1:])
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        if args.profile:
            from .profile import profile

            return runner.run(_stoppable(profile(sizes, out / "profile", pin=not args.no_pin,
                                                 gateway_source=args.gateway_src)))
        if args.instructions:
            from .instructions import instructions

            return runner.run(_stoppable(instructions(sizes, args.gateway_src)))
        from .runner import run

        results = runner.run(_stoppable(run(sizes, args.only or list(SCENARIOS), out,
                                            pin=not args.no_pin, use_nginx=not args.no_nginx,
                                            command=command.strip(),
                                            gateway_source=args.gateway_src)))
    failed = any(r.error for r in results) or any(
        row.ok is False for r in results for row in r.rows)
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: every child process was stopped", file=sys.stderr)
        sys.exit(130)
