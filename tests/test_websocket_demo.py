"""The README's WebSocket snippet, run as written (but for the port) in a child process with
the real `websockets` client, against the demo config (`config/gateway.yaml`): its worker pool
of real fake-llm processes, its WebSocket route. What `make run` promises."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from gateway.fake_llm import VOCAB

REPO = Path(__file__).resolve().parent.parent


def readme_websocket_snippet() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## WebSocket\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def demo_config() -> str:
    """config/gateway.yaml on ports of its own, its workers started by this interpreter."""
    text = (REPO / "config/gateway.yaml").read_text(encoding="utf-8")
    for written, here in [
        ("${STREAMGATE_LISTEN:-127.0.0.1:8080}", "127.0.0.1:0"),
        ("listen: 127.0.0.1:9901", "listen: 127.0.0.1:0"),
        ("access_log: json", "access_log: off"),
        ('["streamgate", "fake-llm"', f'["{sys.executable}", "-m", "gateway", "fake-llm"'),
    ]:
        assert written in text, written
        text = text.replace(written, here)
    return text


async def test_the_readme_websocket_snippet_streams_through_the_demo_gateway(
    start_gateway, client
):
    gw = await start_gateway(demo_config())
    async with asyncio.timeout(20):  # until its workers answer /health
        while True:
            async with client.get(gw.admin_url + "/readyz") as ready:
                if ready.status == 200:
                    break
            await asyncio.sleep(0.05)
    snippet = readme_websocket_snippet()
    assert "ws://127.0.0.1:8080/" in snippet
    snippet = snippet.replace("ws://127.0.0.1:8080", gw.url.replace("http://", "ws://"))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", snippet, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(child.communicate(), 20)
    assert child.returncode == 0
    words = out.decode().split()
    assert len(words) >= 24 and all(word + " " in VOCAB for word in words)  # the demo's 24 tokens
