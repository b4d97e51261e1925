"""The local worker pool, with real worker processes: start-up and readiness, restarts and their
backoff, the environment each worker gets, output in the log, stopping, and no orphans.

The first part drives `WorkerSupervisor` directly. The second goes through the gateway (routing
to the workers, a worker killed mid-stream, reloads, the gateway killed); it runs once
`gateway.runtime` starts worker pools.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.config.loader import load_config
from gateway.config.model import ReadyConfig, RestartConfig, WorkerPoolUpstream
from gateway.observe.metrics import Metrics
from gateway.protocols.http.client import HttpClient
from gateway.upstreams.workers import WorkerSupervisor
from tests.conftest import GatewayProcess, chat_body
from tests.support.procs import REPO_ROOT

FAKE_LLM = (sys.executable, "-m", "gateway", "fake-llm", "--port", "{port}")
SLOW_READY = (  # worker i listens at once, but is not ready for its first i * N seconds
    sys.executable,
    "-m",
    "tests.support.workers_helpers",
    "slow-ready",
    "--port",
    "{port}",
    "--index",
    "{index}",
    "--ready-after-per-index",
)
ENV = {"PYTHONPATH": str(REPO_ROOT)}  # whatever the current directory, workers import gateway


def pool_config(command=FAKE_LLM, **fields) -> WorkerPoolUpstream:
    defaults = dict(
        count=2,
        env=ENV,
        ready=ReadyConfig(timeout=15.0, interval=0.2),
        restart=RestartConfig(backoff=0.1, max_backoff=1.0),
        stop_grace=2.0,
    )
    return WorkerPoolUpstream(command=tuple(command), **{**defaults, **fields})


@pytest.fixture
async def supervise():
    """Start a supervisor; every one started is stopped at the end, whatever happened."""
    started: list[WorkerSupervisor] = []

    async def start(config: WorkerPoolUpstream, name: str = "p") -> WorkerSupervisor:
        supervisor = WorkerSupervisor(name, config, Metrics(), HttpClient)
        started.append(supervisor)
        await supervisor.start()
        return supervisor

    yield start
    for supervisor in started:
        await supervisor.stop()


async def eventually(predicate: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s}s: {what}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill_all(pids) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def restarts(supervisor: WorkerSupervisor) -> float:
    value = supervisor._metrics.registry.get_sample_value(
        "streamgate_worker_restarts_total", {"upstream": supervisor.name}
    )
    return value or 0.0


def pid_of(worker) -> int | None:
    return worker.process.pid if worker.process is not None else None


def pids(supervisor: WorkerSupervisor) -> list[int | None]:
    return [pid_of(w) for w in supervisor.workers]


def all_ready(supervisor: WorkerSupervisor) -> Callable[[], bool]:
    return lambda: all(w.endpoint.healthy for w in supervisor.workers)


async def get_json(url: str) -> tuple[int, dict]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.json(content_type=None)


async def up_but_not_ready(url: str, within_s: float = 10) -> None:
    """Wait until the worker at `url` listens and answers its /health with 503."""
    deadline = time.monotonic() + within_s
    status = 0
    while status != 503:
        assert time.monotonic() < deadline, f"{url} not up within {within_s}s"
        with contextlib.suppress(aiohttp.ClientError):
            status, _ = await get_json(url + "/health")
        await asyncio.sleep(0.02)


def consecutive_free_ports(n: int) -> int:
    for _ in range(50):
        with socket.create_server(("127.0.0.1", 0)) as sock:
            base = sock.getsockname()[1]
        if base + n > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + n):
                    stack.enter_context(socket.create_server(("127.0.0.1", port)))
            except OSError:
                continue
        return base
    raise RuntimeError("no run of free ports")


# ----------------------------------------------------------------- the supervisor on its own


async def test_start_returns_at_once_and_workers_join_rotation_when_ready(supervise):
    sup = await supervise(pool_config(count=2))
    assert not any(w.endpoint.healthy for w in sup.workers)  # it did not wait for them
    assert all("starting" in problem for problem in sup.status())

    await eventually(all_ready(sup), 10, "both workers in rotation")
    urls = [w.endpoint.url for w in sup.workers]
    assert len(set(urls)) == 2
    for url, pid in zip(urls, pids(sup), strict=True):
        status, body = await get_json(url + "/debug/env")
        assert (status, body["pid"]) == (200, pid)
    assert sup.status() == []
    assert [ep.url for ep in sup.pool.endpoints] == urls


async def test_gpu_index_and_port_placeholders_and_cuda_visible_devices_per_worker(supervise):
    base = consecutive_free_ports(2)
    env = {**ENV, "FAKE_LLM_SLOT": "{index}:{gpu}:{port}", "CUDA_VISIBLE_DEVICES": "overridden"}
    command = (*FAKE_LLM, "--model", "gpu{gpu}-worker{index}")
    sup = await supervise(
        pool_config(command, count=None, gpus=("3", "5,6"), port_base=base, env=env)
    )
    await eventually(all_ready(sup), 10, "both workers in rotation")

    for index, gpu in enumerate(("3", "5,6")):
        url = f"http://127.0.0.1:{base + index}"
        assert sup.workers[index].endpoint.url == url
        _, body = await get_json(url + "/debug/env")
        assert body["env"]["CUDA_VISIBLE_DEVICES"] == gpu  # the GPU wins over `env`
        assert body["env"]["FAKE_LLM_SLOT"] == f"{index}:{gpu}:{base + index}"
        assert body["argv"][-2:] == ["--model", f"gpu{gpu}-worker{index}"]


async def test_streamgate_as_the_command_runs_this_gateways_own_code(supervise):
    sup = await supervise(pool_config(("streamgate", "fake-llm", "--port", "{port}"), count=1))
    await eventually(all_ready(sup), 10, "the worker in rotation")
    _, body = await get_json(sup.workers[0].endpoint.url + "/debug/env")
    assert body["argv"][0].endswith(os.path.join("gateway", "__main__.py"))


async def test_worker_output_is_logged_line_by_line_with_pool_and_index(supervise, caplog):
    caplog.set_level(logging.INFO, logger="streamgate.workers")
    script = 'echo "hello from {index}"; echo "to stderr" >&2; exec sleep 30'
    sup = await supervise(pool_config(("sh", "-c", script, "{port}")), name="gpus")
    expected = {
        "gpus[0] | hello from 0",
        "gpus[1] | hello from 1",
        "gpus[0] | to stderr",
        "gpus[1] | to stderr",
    }
    await eventually(
        lambda: expected <= {r.getMessage() for r in caplog.records}, 5, f"log lines {expected}"
    )
    assert len(sup.workers) == 2


async def test_a_worker_that_is_up_but_not_ready_gets_no_traffic_until_it_is(supervise):
    # Worker 1 listens at once but its /health answers 503 for two seconds.
    sup = await supervise(pool_config((*SLOW_READY, "2")))
    first, slow = sup.workers
    await eventually(lambda: first.endpoint.healthy, 10, "worker 0 in rotation")
    await up_but_not_ready(slow.endpoint.url)

    assert not slow.endpoint.healthy
    assert {sup.pool.pick(set()) for _ in range(10)} == {first.endpoint}
    assert any(p.startswith("p[1]: starting, not ready after") for p in sup.status())

    await eventually(lambda: slow.endpoint.healthy, 10, "worker 1 in rotation once ready")
    assert {sup.pool.pick(set()) for _ in range(10)} == {first.endpoint, slow.endpoint}
    assert restarts(sup) == 0


async def test_a_worker_not_ready_within_ready_timeout_is_restarted(supervise):
    sup = await supervise(
        pool_config(
            ("sh", "-c", "exec sleep 30", "{port}"), count=1, ready=ReadyConfig(timeout=0.3)
        )
    )
    worker = sup.workers[0]
    await eventually(lambda: pid_of(worker) is not None, 2, "spawned")
    first_pid = pid_of(worker)

    await eventually(lambda: restarts(sup) >= 1, 3, "a restart")
    assert worker.last_failure == "not ready within 0.3s"
    await eventually(lambda: not alive(first_pid), 3, "the first process gone")
    await eventually(lambda: pid_of(worker) not in (None, first_pid), 3, "a new process")
    assert not worker.endpoint.healthy


async def test_a_killed_worker_leaves_rotation_at_once_and_comes_back_on_its_port(supervise):
    sup = await supervise(pool_config(count=2))
    await eventually(all_ready(sup), 10, "both workers in rotation")
    victim, other = sup.workers
    old_pid, url = victim.process.pid, victim.endpoint.url

    os.kill(old_pid, signal.SIGKILL)
    await eventually(lambda: not victim.endpoint.healthy, 0.5, "the dead worker out of rotation")
    assert other.endpoint.healthy
    assert {sup.pool.pick(set()) for _ in range(5)} == {other.endpoint}
    assert re.fullmatch(
        r"p\[0\]: (restarting after 1 crash in a row, next try in [\d.]+s"
        r"|starting again after 1 crash in a row) \(last: killed by SIGKILL\)",
        sup.status()[0],
    ), sup.status()

    await eventually(lambda: victim.endpoint.healthy, 10, "the worker back in rotation")
    assert victim.process.pid != old_pid
    assert victim.endpoint.url == url
    _, body = await get_json(url + "/debug/env")
    assert body["pid"] == victim.process.pid
    assert restarts(sup) == 1
    assert sup.status() == []


async def test_a_crash_loop_backs_off_exponentially_and_is_visible(supervise, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="streamgate.workers")
    starts = tmp_path / "starts"
    script = 'date +%s.%N >> "$STARTS"; echo "giving up"; exit 3'
    config = pool_config(
        ("sh", "-c", script, "{port}"),
        count=1,
        env={"STARTS": str(starts)},
        restart=RestartConfig(backoff=0.1, max_backoff=0.4),
    )
    sup = await supervise(config)

    def started() -> list[float]:
        return [float(t) for t in starts.read_text().split()] if starts.exists() else []

    await eventually(lambda: len(started()) >= 5, 5, "five starts")
    times = started()[:5]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for gap, backoff in zip(gaps, (0.1, 0.2, 0.4, 0.4), strict=True):  # doubling, capped
        assert backoff <= gap < backoff + 0.4, gaps

    assert restarts(sup) >= 4
    assert re.fullmatch(
        r"p\[0\]: (restarting after \d+ crashes in a row, next try in [\d.]+s"
        r"|starting again after \d+ crashes in a row) \(last: exited with status 3\)",
        sup.status()[0],
    ), sup.status()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.INFO, "p[0] | giving up") in messages
    assert any(level == logging.ERROR and "crash loop" in m for level, m in messages), messages


async def test_a_command_that_cannot_run_is_a_crash_loop_not_a_crash(supervise):
    sup = await supervise(pool_config(("/nonexistent/worker", "{port}"), count=1))
    await eventually(lambda: restarts(sup) >= 2, 3, "restarts")
    assert "cannot run '/nonexistent/worker'" in sup.status()[0]


async def test_stop_sigterms_the_workers_which_exit_cleanly(supervise):
    sup = await supervise(pool_config(count=2, stop_grace=5.0))
    await eventually(all_ready(sup), 10, "both workers in rotation")
    procs = [w.process.proc for w in sup.workers]

    started = time.monotonic()
    await sup.stop()
    assert time.monotonic() - started < 2.0  # not the 5 s grace: SIGTERM was enough
    assert [p.returncode for p in procs] == [0, 0]
    assert not any(w.endpoint.healthy for w in sup.workers)


async def test_stop_kills_the_whole_group_after_stop_grace(supervise, caplog):
    # Both the worker and the helper it forks ignore SIGTERM; only the group SIGKILL ends them.
    caplog.set_level(logging.INFO, logger="streamgate.workers")
    script = 'trap "" TERM; sleep 30 & echo "helper $!"; wait'
    sup = await supervise(pool_config(("sh", "-c", script, "{port}"), count=1, stop_grace=0.5))
    helper = re.compile(r"p\[0\] \| helper (\d+)")
    await eventually(
        lambda: any(helper.match(r.getMessage()) for r in caplog.records), 5, "the helper started"
    )
    helper_pid = int(next(m[1] for r in caplog.records if (m := helper.match(r.getMessage()))))
    leader_pid = sup.workers[0].process.pid
    try:
        started = time.monotonic()
        await sup.stop()
        assert 0.5 <= time.monotonic() - started < 3.0
        assert sup.workers[0].process.proc.returncode == -signal.SIGKILL
        await eventually(lambda: not alive(helper_pid), 2, "the helper gone")
        assert not alive(leader_pid)
    finally:
        kill_all([helper_pid])


async def test_stop_right_after_start_leaves_no_process(supervise):
    sup = await supervise(pool_config(count=2))
    await sup.stop()
    spawned = [pid for pid in pids(sup) if pid is not None]
    assert not [pid for pid in spawned if alive(pid)]


async def test_workers_die_with_the_process_that_supervises_them_even_on_sigkill():
    owner = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.workers_helpers",
        "supervise",
        "2",
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
        env={**os.environ, **ENV},
    )
    workers: list[int] = []
    try:
        async with asyncio.timeout(15):
            line = (await owner.stdout.readline()).decode()
        workers = [int(pid) for pid in line.removeprefix("workers:").split()]
        assert len(workers) == 2 and all(alive(pid) for pid in workers), line

        owner.kill()
        await owner.wait()
        await eventually(lambda: not any(alive(pid) for pid in workers), 5, "no orphan worker")
    finally:
        kill_all([owner.pid] if owner.returncode is None else [])
        kill_all(workers)
        await owner.wait()


@pytest.mark.parametrize("name", ["worker-pool.yaml", "vllm-pool.yaml"])
def test_the_worker_pool_examples_are_valid(name):
    config = load_config(str(REPO_ROOT / "config" / "examples" / name))
    assert any(isinstance(u, WorkerPoolUpstream) for u in config.upstreams.values())


# ----------------------------------------------------------------- through the gateway

def gateway_yaml(command=FAKE_LLM, env: dict[str, str] | None = None) -> str:
    return (
        "server: {listen: 127.0.0.1:0, shutdown_grace: 2s}\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "telemetry: {access_log: off}\n"
        "upstreams:\n"
        "  local:\n"
        "    kind: worker_pool\n"
        f"    command: {json.dumps(list(command))}\n"
        "    count: 2\n"
        "    balance: round_robin\n"
        f"    env: {json.dumps({**ENV, **(env or {})})}\n"
        "    ready: {path: /health, timeout: 15s, interval: 200ms}\n"
        "    restart: {backoff: 100ms, max_backoff: 1s}\n"
        "    stop_grace: 2s\n"
        "routes:\n"
        "  - name: r\n"
        "    upstream: local\n"
        "    match: {path_prefix: /}\n"
        "    retry: {attempts: 3, backoff: {base: 10ms, max: 50ms}}\n"
    )


async def served_by(client: aiohttp.ClientSession, gw_url: str) -> int:
    """The pid of the worker that answers one request through the gateway."""
    async with client.get(gw_url + "/debug/env") as response:
        assert response.status == 200, await response.text()
        return (await response.json())["pid"]


async def worker_pids_via(client, gw_url: str, n: int = 2, within_s: float = 15) -> set[int]:
    """Ask through the gateway until `n` different workers have answered."""
    seen: set[int] = set()
    deadline = time.monotonic() + within_s
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {seen} answered within {within_s}s"
        with contextlib.suppress(AssertionError, aiohttp.ClientError):
            seen.add(await served_by(client, gw_url))
        await asyncio.sleep(0.05)
    return seen


def worker_pool_of(gw):
    return gw.runtime.pools["local"]


async def test_the_gateway_routes_to_both_workers(start_gateway, client):
    gw = await start_gateway(gateway_yaml())
    await eventually(lambda: all(ep.healthy for ep in worker_pool_of(gw).endpoints), 10, "ready")

    assert len({await served_by(client, gw.url) for _ in range(4)}) == 2  # round robin
    body = chat_body(stream=True)
    async with client.post(gw.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert (await response.read()).endswith(b"data: [DONE]\n\n")


async def test_through_the_gateway_a_worker_not_yet_ready_gets_no_traffic(start_gateway, client):
    gw = await start_gateway(gateway_yaml((*SLOW_READY, "3")))
    first, slow = worker_pool_of(gw).endpoints
    await eventually(lambda: first.healthy, 10, "worker 0 in rotation")
    await up_but_not_ready(slow.url)
    status, readyz = await get_json(gw.admin_url + "/readyz")
    assert status == 200
    assert any(r.startswith("local[1]: starting") for r in readyz["reasons"]), readyz

    for _ in range(6):
        async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as response:
            assert response.status == 200
    _, stats = await get_json(slow.url + "/debug/stats")
    assert stats["requests"].get("/v1/chat/completions", 0) == 0  # up, not ready: no traffic

    await eventually(lambda: slow.healthy, 10, "worker 1 in rotation once ready")
    for _ in range(4):
        async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as response:
            assert response.status == 200
    _, stats = await get_json(slow.url + "/debug/stats")
    assert stats["requests"]["/v1/chat/completions"] >= 1


async def test_a_worker_killed_mid_stream_ends_its_stream_with_an_error_event(
    start_gateway, client
):
    gw = await start_gateway(gateway_yaml())
    endpoints = worker_pool_of(gw).endpoints
    await eventually(lambda: all(ep.healthy for ep in endpoints), 10, "ready")

    long_stream = chat_body(fake={"tokens": 2000, "tokens_per_s": 100})
    async with client.post(gw.url + "/v1/chat/completions", json=long_stream) as response:
        assert response.status == 200
        received = b""
        while received.count(b'"content"') < 3:
            received += await response.content.readany()
        _, listing = await get_json(gw.admin_url + "/admin/streams")
        victim = next(ep for ep in endpoints if ep.url == listing["streams"][0]["endpoint"])
        _, env = await get_json(victim.url + "/debug/env")
        os.kill(env["pid"], signal.SIGKILL)
        rest = await response.content.read()

    last_event = (received + rest).rstrip(b"\n").split(b"\n\n")[-1]
    assert last_event.startswith(b"event: error"), last_event
    assert b"[DONE]" not in rest
    await eventually(lambda: not victim.healthy, 0.5, "the dead worker out of rotation")
    for _ in range(4):  # meanwhile, new requests go to the other worker
        async with client.post(gw.url + "/v1/chat/completions", json=chat_body()) as response:
            assert response.status == 200
            await response.read()

    await eventually(lambda: victim.healthy, 10, "the worker back in rotation")
    _, env_after = await get_json(victim.url + "/debug/env")
    assert env_after["pid"] != env["pid"]
    assert env_after["pid"] in await worker_pids_via(client, gw.url)  # traffic resumes


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_no_worker_outlives_the_gateway(tmp_path: Path, client, sig):
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml())
    gw = GatewayProcess(path)
    await gw.start()
    workers: set[int] = set()
    try:
        workers = await worker_pids_via(client, gw.url)
        gw.proc.send_signal(sig)
        code = await asyncio.wait_for(gw.proc.wait(), 10)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        await eventually(lambda: not any(alive(pid) for pid in workers), 5, "no orphan worker")
    finally:
        await gw.stop()
        kill_all(workers)


async def test_a_reload_keeps_an_unchanged_pool_running_and_restarts_a_changed_one(
    tmp_path, client
):
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml())
    gw = GatewayProcess(path)
    await gw.start()
    before: set[int] = set()
    after: set[int] = set()
    try:
        before = await worker_pids_via(client, gw.url)
        async with client.post(gw.admin_url + "/admin/reload") as response:
            assert (await response.json()) == {"result": "ok"}
        assert await worker_pids_via(client, gw.url) == before
        assert all(alive(pid) for pid in before)

        path.write_text(gateway_yaml(env={"FAKE_LLM_GENERATION": "2"}))
        async with client.post(gw.admin_url + "/admin/reload") as response:
            assert (await response.json()) == {"result": "ok"}
        after = await worker_pids_via(client, gw.url)
        assert not after & before
        await eventually(lambda: not any(alive(pid) for pid in before), 5, "old workers stopped")
    finally:
        await gw.stop()
        kill_all(before | after)
