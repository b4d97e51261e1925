"""A BlazeRPC model server for config/examples/blazerpc.yaml (BlazeRPC is not a streamgate
dependency: `pip install blazerpc`).

    cd config/examples/blazerpc && blaze serve model:app --host 127.0.0.1 --port 50051

`@app.model("generate", streaming=True)` is served as
`rpc PredictGenerate(GenerateRequest) returns (stream GenerateResponse)` in
`blazerpc.InferenceService`; `@app.model("echo")` as the unary `PredictEcho`.
"""

import asyncio

from blazerpc import BlazeApp

app = BlazeApp(name="streamgate-example", enable_batching=False)


@app.model("generate", streaming=True)
async def generate(prompt: str, tokens: int) -> str:
    try:
        for i in range(tokens):
            yield f"{prompt} #{i}"
            await asyncio.sleep(0.05)
    finally:  # a client that cancels (through the gateway too) ends up here at once
        print(f"generate({prompt!r}) ended", flush=True)


@app.model("echo")
def echo(text: str) -> str:
    return text
