"""One process per core, over real processes: `streamgate serve --workers 2` (or
`server.workers: 2`) is a supervisor and two serving processes on one port, each test driving
it from outside as an operator would: fresh connections (the kernel spreads them between the
processes), the supervisor's admin listener, signals.

Which process served what is read from /admin/streams (every stream names its process's pid)
and from each process's private admin listener (listed by /admin/processes). Connections are
spread by a hash, not in turn, so a test that needs both processes opens streams until it has
one on each, with a bound far beyond any bad luck.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import uuid
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayProcess
from tests.support.procs import FakeLLM

CHAT = "/v1/chat/completions"
ENOUGH_TRIES = 40
"""Fresh connections opened to find one on each of two processes: (1/2)^39 to fail by chance."""


def gateway_yaml(upstream_url: str, top: str = "", route: str = "", workers: int = 2) -> str:
    return (
        f"server: {{listen: 127.0.0.1:0, workers: {workers}, shutdown_grace: 10s}}\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "telemetry: {access_log: off}\n"
        + textwrap.dedent(top)
        + f'upstreams:\n  llm: {{kind: http, endpoints: [{{url: "{upstream_url}"}}]}}\n'
        + "routes:\n  - name: chat\n    upstream: llm\n    match: {path: /v1/chat/completions}\n"
        + textwrap.indent(textwrap.dedent(route), "    ")
        + "  - {name: other, upstream: llm, match: {path_prefix: /}}\n"
    )


@pytest.fixture
async def llm():
    async with FakeLLM() as upstream:
        yield upstream


@pytest.fixture
async def run_gateway(tmp_path: Path):
    started: list[GatewayProcess] = []

    async def start(yaml_text: str, *flags: str) -> GatewayProcess:
        path = tmp_path / f"gateway-{len(started)}.yaml"
        path.write_text(yaml_text)
        gateway = GatewayProcess(path)
        gateway.argv += list(flags)
        gateway.config_path = path
        gateway.start_timeout_s = 60.0
        gateway.stop_timeout_s = 20.0
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.proc is not None and gateway.proc.returncode is None:
            await gateway.stop()


# ----------------------------------------------------------------- reading the gateway


async def get_json(url: str) -> dict:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()


async def processes(gateway: GatewayProcess) -> list[dict]:
    return (await get_json(gateway.admin_url + "/admin/processes"))["processes"]


async def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, keys), value in samples.items()
        if sample == name and labels.items() <= dict(keys).items()
    )


async def request(url: str, path: str = CHAT, **fake) -> int:
    """One unary request on a connection of its own; its status (0: the connection failed)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "fake": fake}
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.post(url + path, json=body) as response,
        ):
            await response.read()
            return response.status
    except aiohttp.ClientConnectionError:
        return 0


async def eventually(check, within_s: float, what: str):
    """Bounded wait for state with no event of its own (a process restarting)."""
    async with asyncio.timeout(within_s):
        while not (found := await check()):
            await asyncio.sleep(0.05)
    assert found, what
    return found


class HeldStream:
    """A stream held open on a connection of its own, past its commit point."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        self.response: aiohttp.ClientResponse | None = None

    async def open(self, url: str, tokens: int = 10_000, tokens_per_s: float = 10) -> int:
        body = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "fake": {"tokens": tokens, "tokens_per_s": tokens_per_s, "ttft": 0},
        }
        headers = {"x-request-id": self.id}
        try:
            self.response = await self.session.post(url + CHAT, json=body, headers=headers)
            if self.response.status == 200:
                await self.response.content.readany()
        except BaseException:
            await self.close()
            raise
        return self.response.status

    async def read_to_end(self) -> bytes:
        assert self.response is not None
        return await self.response.read()

    async def close(self) -> None:
        if self.response is not None:
            self.response.close()
        await self.session.close()


async def pid_of(gateway: GatewayProcess, stream: HeldStream) -> int:
    async def listed():
        streams = (await get_json(gateway.admin_url + "/admin/streams"))["streams"]
        return next((s["pid"] for s in streams if s["id"] == stream.id), None)

    return await eventually(listed, 5, f"stream {stream.id} in /admin/streams")


async def one_stream_per_process(gateway: GatewayProcess, **knobs) -> dict[int, HeldStream]:
    """A held stream on each of the two processes: {pid: stream}."""
    held: dict[int, HeldStream] = {}
    for _ in range(ENOUGH_TRIES):
        stream = HeldStream()
        if await stream.open(gateway.url, **knobs) != 200:  # units still being given back
            await stream.close()
            await asyncio.sleep(0.05)
            continue
        pid = await pid_of(gateway, stream)
        if pid in held:
            await stream.close()
            continue
        held[pid] = stream
        if len(held) == 2:
            return held
    raise AssertionError(f"{ENOUGH_TRIES} connections, all on one process: {list(held)}")


# ----------------------------------------------------------------- serving


async def test_two_processes_serve_one_port_and_metrics_count_both(run_gateway, llm):
    gateway = await run_gateway(gateway_yaml(llm.url))
    listed = await processes(gateway)
    assert [p["state"] for p in listed] == ["ready", "ready"]
    held = await one_stream_per_process(gateway)
    assert set(held) == {p["pid"] for p in listed}
    for stream in held.values():
        await stream.close()

    async def served_by_each() -> list[float]:
        return [
            total(await scrape(p["admin"]), "streamgate_requests_total", status="200")
            for p in listed
        ]

    sent = 0
    for _ in range(ENOUGH_TRIES):
        assert await request(gateway.url) == 200
        sent += 1
        if all(await served_by_each()):
            break
    each = await served_by_each()
    assert all(each), f"one process served all {sent} requests"
    merged = await scrape(gateway.admin_url)
    assert total(merged, "streamgate_requests_total", status="200") == sum(each) == sent


async def test_a_killed_process_is_restarted_while_the_port_keeps_serving(run_gateway, llm):
    gateway = await run_gateway(gateway_yaml(llm.url))
    for _ in range(6):
        assert await request(gateway.url) == 200
    counted = total(await scrape(gateway.admin_url), "streamgate_requests_total")
    victim = (await processes(gateway))[0]
    os.kill(victim["pid"], signal.SIGKILL)

    async def gone():
        first = (await processes(gateway))[0]
        return first["pid"] != victim["pid"] or first["state"] != "ready"

    await eventually(gone, 10, "the supervisor noticing the kill")
    # Its listening socket died with it: every new connection goes to the other process.
    assert [await request(gateway.url) for _ in range(10)] == [200] * 10

    async def back():
        first = (await processes(gateway))[0]
        return first["state"] == "ready" and first["pid"] not in (None, victim["pid"])

    await eventually(back, 30, "process 0 back in rotation with a new pid")
    merged = await scrape(gateway.admin_url)
    assert total(merged, "streamgate_process_restarts_total") == 1
    # What the killed process had counted by the last scrape is kept, not lost with it.
    assert total(merged, "streamgate_requests_total") >= counted + 10
    held = await one_stream_per_process(gateway)  # and the new one serves too
    for stream in held.values():
        await stream.close()


async def test_a_port_another_gateway_holds_is_refused_not_shared(run_gateway, llm, tmp_path):
    running = await run_gateway(gateway_yaml(llm.url))
    path = tmp_path / "second.yaml"
    path.write_text(gateway_yaml(llm.url).replace("127.0.0.1:0,", f"127.0.0.1:{running.port},"))
    second = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path),
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{running.port}" in stderr.decode()
    assert "Traceback" not in stderr.decode()


# ----------------------------------------------------------------- reload and drain


async def post_reload(gateway: GatewayProcess) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.admin_url + "/admin/reload") as response,
    ):
        return response.status, await response.json()


async def private_configs(gateway: GatewayProcess) -> list[str]:
    return [str(await get_json(p["admin"] + "/admin/config")) for p in await processes(gateway)]


async def test_reload_reaches_every_process_and_a_bad_config_reaches_none(run_gateway, llm):
    async with FakeLLM() as other:
        gateway = await run_gateway(gateway_yaml(llm.url))
        path: Path = gateway.config_path  # type: ignore[attr-defined]
        path.write_text(gateway_yaml(other.url))
        assert await post_reload(gateway) == (200, {"result": "ok"})
        assert all(other.url in config for config in await private_configs(gateway))

        path.write_text(gateway_yaml(llm.url))  # and by SIGHUP
        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGHUP)

        async def both_back():
            return all(llm.url in config for config in await private_configs(gateway))

        await eventually(both_back, 10, "SIGHUP reaching both processes")

        path.write_text(gateway_yaml(other.url).replace("routes:", "routes: oops\n"))
        status, answer = await post_reload(gateway)
        assert status == 400
        errors = answer["errors"]
        assert errors and all(e.startswith(f"{path}:") for e in errors), errors
        assert all(llm.url in config for config in await private_configs(gateway))

        # A process that restarts now comes back on the config the others serve, not the
        # broken file on disk.
        victim = (await processes(gateway))[1]
        os.kill(victim["pid"], signal.SIGKILL)

        async def back():
            second = (await processes(gateway))[1]
            return second["state"] == "ready" and second["pid"] != victim["pid"]

        await eventually(back, 30, "process 1 back in rotation")
        assert all(llm.url in config for config in await private_configs(gateway))
        assert [await request(gateway.url) for _ in range(4)] == [200] * 4


async def test_sigterm_drains_every_process_and_the_supervisor_exits_when_all_have(
    run_gateway, llm
):
    gateway = await run_gateway(gateway_yaml(llm.url), "--workers", "2")
    pids = {p["pid"] for p in await processes(gateway)}
    held = await one_stream_per_process(gateway, tokens=40, tokens_per_s=10)
    assert gateway.proc is not None
    gateway.proc.send_signal(signal.SIGTERM)

    async def draining():  # the supervisor's at once; each process's once its SIGTERM is in
        urls = [gateway.admin_url] + [p["admin"] for p in await processes(gateway)]
        answers = [await get_json(url + "/readyz") for url in urls]
        return all(answer["ready"] is False for answer in answers)

    await eventually(draining, 5, "/readyz turning 503 everywhere")
    assert await request(gateway.url) in (503, 0)  # refused with 503, or not accepted
    bodies = await asyncio.gather(*(s.read_to_end() for s in held.values()))
    assert all(body.rstrip().endswith(b"data: [DONE]") for body in bodies)
    for stream in held.values():
        await stream.close()
    assert await asyncio.wait_for(gateway.proc.wait(), 20) == 0
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]


# ----------------------------------------------------------------- limits


async def test_local_limits_are_split_between_the_processes(run_gateway, llm):
    top = "limits:\n  concurrency:\n    slots: {capacity: 2, max_queue: 0}\n"
    route = "limits: [slots]\ntimeouts: {queue: 100ms}\n"
    gateway = await run_gateway(gateway_yaml(llm.url, top, route))
    merged = await scrape(gateway.admin_url)
    assert total(merged, "streamgate_concurrency_capacity", limit="slots") == 2
    held = await one_stream_per_process(gateway)  # one unit each: both shares taken
    statuses = await asyncio.gather(*(request(gateway.url) for _ in range(6)))
    assert statuses == [503] * 6
    assert total(await scrape(gateway.admin_url), "streamgate_concurrency_in_use") == 2
    for stream in held.values():
        await stream.close()


async def test_a_local_limit_too_small_to_split_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "small.yaml"
    top = "limits:\n  concurrency:\n    slots: {capacity: 1}\n"
    path.write_text(gateway_yaml("http://127.0.0.1:9", top, "limits: [slots]\n", workers=1))
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path), "--workers", "2",
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(serve.communicate(), 30)
    assert serve.returncode == 1
    assert f"{path}:6:" in stderr.decode()
    assert "limits.concurrency.slots.capacity: capacity 1 is split across 2" in stderr.decode()


@pytest.mark.redis
async def test_global_limits_are_exact_across_the_processes(run_gateway, llm, redis_url):
    slots, rate = (f"{n}-{uuid.uuid4().hex[:8]}" for n in ("slots", "rate"))
    top = f"""\
        state: {{backend: redis, redis_url: "{redis_url}"}}
        limits:
          concurrency:
            {slots}: {{capacity: 2, max_queue: 0, scope: global}}
          rate:
            {rate}: {{rate: 5, per: 60s, scope: global}}
        """
    route = f"limits: [{slots}]\ntimeouts: {{queue: 100ms}}\n"
    yaml_text = gateway_yaml(llm.url, top, route).replace(
        "match: {path_prefix: /}}", f"match: {{path_prefix: /}}, limits: [{rate}]}}"
    )
    gateway = await run_gateway(yaml_text)
    held = await one_stream_per_process(gateway)  # one unit in each process: all 2 taken
    statuses = await asyncio.gather(*(request(gateway.url) for _ in range(8)))
    assert statuses == [503] * 8, "a process admitted past the global capacity"
    for stream in held.values():
        await stream.close()

    statuses = [await request(gateway.url, "/v1/completions") for _ in range(12)]
    assert (statuses.count(200), statuses.count(429)) == (5, 7)
    served = [
        total(await scrape(p["admin"]), "streamgate_requests_total", route="other")
        for p in await processes(gateway)
    ]
    assert all(served), f"one process answered every rate-limited request: {served}"


# ----------------------------------------------------------------- worker pools


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append((int(stat.parent.name), cmdline))
    return found


async def test_a_worker_pool_is_started_once_and_every_process_routes_to_it(run_gateway):
    """And a reload that changes the pool starts the new one once and stops the old one."""
    pool = """\
        upstreams:
          llm:
            kind: worker_pool
            command: ["streamgate", "fake-llm", "--port", "{port}"]
            count: 2
            ready: {timeout: 30s}
        """
    yaml_text = gateway_yaml("http://unused", pool).replace(
        'upstreams:\n  llm: {kind: http, endpoints: [{url: "http://unused"}]}\n', ""
    )
    gateway = await run_gateway(yaml_text)
    assert gateway.proc is not None
    workers = [pid for pid, cmd in children_of(gateway.proc.pid) if "fake-llm" in cmd]
    assert len(workers) == 2
    for process in await processes(gateway):
        assert not [c for c in children_of(process["pid"]) if "fake-llm" in c[1]]

    async def workers_ready():
        return (await get_json(gateway.admin_url + "/readyz"))["ready"]

    await eventually(workers_ready, 30, "the workers in rotation")
    held = await one_stream_per_process(gateway)  # both processes reach the workers
    for stream in held.values():
        await stream.close()

    path: Path = gateway.config_path  # type: ignore[attr-defined]
    path.write_text(yaml_text.replace('"{port}"]', '"{port}", "--model", "renewed"]'))
    assert await post_reload(gateway) == (200, {"result": "ok"})

    async def replaced():
        now = [(pid, cmd) for pid, cmd in children_of(gateway.proc.pid) if "fake-llm" in cmd]
        return len(now) == 2 and all("renewed" in cmd and pid not in workers for pid, cmd in now)

    await eventually(replaced, 30, "the new pool running and the old one stopped")
    await eventually(workers_ready, 30, "the new workers in rotation")
    assert [await request(gateway.url) for _ in range(4)] == [200] * 4
