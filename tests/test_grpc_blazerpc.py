"""The real BlazeRPC server (`blaze serve`, grpclib underneath) behind the gateway: an
async-generator model served as `rpc PredictGenerate(GenerateRequest) returns (stream
GenerateResponse)`, called with grpcio through the gateway's gRPC listener, and from plain
HTTP through a bridge route (SSE and NDJSON).

BlazeRPC 2.2.1 registers server reflection and grpc.health.v1, but its raw-bytes codec hands
their servicers bytes, so both answer UNKNOWN; the bridge therefore describes its methods
with a descriptor set built from `blaze proto`'s .proto (protoc from grpcio-tools)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from grpc import aio

from tests.support.grpc_calls import grpc_config
from tests.support.grpc_procs import BlazeServer, require_blazerpc
from tests.test_admission import gauges_return_to_zero

GENERATE = "/blazerpc.InferenceService/PredictGenerate"
SHOUT = "/blazerpc.InferenceService/PredictShout"
APP = """
import asyncio

from blazerpc import BlazeApp

app = BlazeApp(name="streamgate-test", enable_batching=False)


@app.model("generate", streaming=True)
async def generate(prompt: str, tokens: int) -> str:
    try:
        for i in range(tokens):
            yield f"{prompt} token {i}"
            await asyncio.sleep(0.01)
    finally:  # BlazeRPC raises CancelledError in here when the call is cancelled
        print(f"finally {prompt}", flush=True)


@app.model("shout")
def shout(text: str) -> str:
    return text.upper()
"""
SLOTS = "limits: {concurrency: {slots: {capacity: 10, weights: {stream: 3, unary: 1}}}}\n"


@pytest.fixture(scope="module")
def blaze_app(tmp_path_factory) -> tuple[Path, Path]:
    """The app's directory, and a descriptor set of the service it exports."""
    require_blazerpc()
    app_dir = tmp_path_factory.mktemp("blaze")
    (app_dir / "blaze_model.py").write_text(APP)
    blaze = str(Path(sys.executable).parent / "blaze")
    env = {"PYTHONPATH": str(app_dir), "PATH": str(Path(sys.executable).parent)}
    subprocess.run(
        [blaze, "proto", "blaze_model:app", "--output-dir", str(app_dir)],
        cwd=app_dir,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    descriptors = app_dir / "blaze.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{app_dir}",
            "--include_imports",
            f"--descriptor_set_out={descriptors}",
            "blaze_service.proto",
        ],
        cwd=app_dir,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return app_dir, descriptors


@pytest.fixture(scope="module")
def blaze(blaze_app):
    server = BlazeServer(blaze_app[0], "blaze_model:app")
    server.start()
    yield server
    server.stop()


def generate_request(prompt: str, tokens: int) -> bytes:
    """GenerateRequest{prompt=1: string, tokens=2: int64}, encoded by hand (no stubs)."""
    raw = prompt.encode()
    return b"\x0a" + _varint(len(raw)) + raw + b"\x10" + _varint(tokens)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


async def stream(target: str, body: bytes) -> tuple[list[bytes], str]:
    async with aio.insecure_channel(target) as channel:
        rpc = channel.unary_stream(GENERATE)(body, timeout=10)
        got = [m async for m in rpc]
        return got, (await rpc.code()).name


def bridge_routes(descriptors: Path) -> str:
    return (
        f"  - name: sse\n    upstream: g\n    match: {{path: /v1/generate}}\n"
        f"    grpc_bridge: {{method: {GENERATE}, descriptor_set: {descriptors}}}\n"
        f"    limits: [slots]\n"
        f"  - name: ndjson\n    upstream: g\n    match: {{path: /v1/generate.ndjson}}\n"
        f"    grpc_bridge: {{method: {GENERATE}, descriptor_set: {descriptors}, output: ndjson}}\n"
        f"  - name: shout\n    upstream: g\n    match: {{path: /v1/shout}}\n"
        f"    grpc_bridge: {{method: {SHOUT}, descriptor_set: {descriptors}}}\n"
        f"  - name: reflected\n    upstream: g\n    match: {{path: /v1/reflected}}\n"
        f"    grpc_bridge: {{method: {GENERATE}}}\n"
    )


async def gateway(start_gateway, blaze, descriptors: Path):
    text = grpc_config(blaze.url, route="limits: [slots]\n", top=SLOTS) + bridge_routes(descriptors)
    return await start_gateway(text)


async def test_a_blazerpc_stream_passes_through_unchanged(start_gateway, blaze, blaze_app, client):
    gw = await gateway(start_gateway, blaze, blaze_app[1])
    body = generate_request("hi", 5)
    direct = await stream(blaze.target, body)
    relayed = await stream(gw.gateway.grpc.address, body)
    assert relayed == direct
    assert len(direct[0]) == 5 and direct[1] == "OK"
    await gauges_return_to_zero(client, gw, "slots")


async def test_a_client_cancel_reaches_the_generators_finally(
    start_gateway, blaze, blaze_app, client
):
    gw = await gateway(start_gateway, blaze, blaze_app[1])
    async with aio.insecure_channel(gw.gateway.grpc.address) as channel:
        rpc = channel.unary_stream(GENERATE)(generate_request("gone", 200))
        for _ in range(3):
            await rpc.read()
        rpc.cancel()
        cancelled_at = time.monotonic()
        await blaze.lines_with("finally gone", timeout=3)
    assert time.monotonic() - cancelled_at < 1.0  # generous here; measured in loadtests
    await gauges_return_to_zero(client, gw, "slots")


async def read_sse(client, url: str, body: dict) -> tuple[int, list[str]]:
    async with client.post(url, json=body) as resp:
        text = await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
    return resp.status, [
        line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")
    ]


async def test_the_bridge_streams_what_the_generator_yielded(
    start_gateway, blaze, blaze_app, client
):
    gw = await gateway(start_gateway, blaze, blaze_app[1])
    status, events = await read_sse(client, gw.url + "/v1/generate", {"prompt": "hi", "tokens": 4})
    assert status == 200
    assert events[-1] == "[DONE]"
    assert [json.loads(e) for e in events[:-1]] == [{"result": f"hi token {i}"} for i in range(4)]
    await gauges_return_to_zero(client, gw, "slots")


async def test_the_bridge_writes_ndjson_and_serves_unary_methods(
    start_gateway, blaze, blaze_app, client
):
    gw = await gateway(start_gateway, blaze, blaze_app[1])
    async with client.post(
        gw.url + "/v1/generate.ndjson", json={"prompt": "n", "tokens": 2}
    ) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = (await resp.text()).splitlines()
    assert [json.loads(line) for line in lines] == [
        {"result": "n token 0"},
        {"result": "n token 1"},
    ]
    status, events = await read_sse(client, gw.url + "/v1/shout", {"text": "hey"})
    assert (status, events) == (200, ['{"result":"HEY"}', "[DONE]"])


async def test_a_body_that_is_not_the_request_message_is_400(
    start_gateway, blaze, blaze_app, client
):
    gw = await gateway(start_gateway, blaze, blaze_app[1])
    async with client.post(gw.url + "/v1/generate", json={"prompt": "x", "nope": 1}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "bad_request" and "blazerpc.GenerateRequest" in error["message"]


async def test_blazerpcs_broken_reflection_is_a_clear_502(start_gateway, blaze, blaze_app, client):
    gw = await gateway(start_gateway, blaze, blaze_app[1])
    async with client.post(gw.url + "/v1/reflected", json={"prompt": "x", "tokens": 1}) as resp:
        assert resp.status == 502
        error = (await resp.json())["error"]
    assert "server reflection failed: UNKNOWN" in error["message"]
