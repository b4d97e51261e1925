"""The gateway's gRPC side from a real grpcio client: configs with a `kind: grpc` upstream, and
one call read to its end as (initial metadata, messages, status, details, trailing metadata)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from grpc import aio

from tests.support.grpc_upstream import STREAM, request, token


def grpc_config(
    upstream_urls: str | list[str],
    route: str = "",
    upstream: str = "",
    top: str = "",
    extra_upstreams: str = "",
    server: str = "",
) -> str:
    """One gRPC upstream `g` and one gRPC route `r` (every method), as `config_yaml` does for
    HTTP; the strings add YAML to each part."""
    urls = [upstream_urls] if isinstance(upstream_urls, str) else upstream_urls
    endpoints = ", ".join(f'{{url: "{u}"}}' for u in urls)
    return (
        f"server: {{listen: 127.0.0.1:0, grpc_listen: 127.0.0.1:0{', ' + server if server else ''}}}\n"
        "admin: {listen: 127.0.0.1:0}\n"
        "telemetry: {access_log: off}\n"
        + textwrap.dedent(top)
        + "upstreams:\n"
        + f"  g:\n    kind: grpc\n    endpoints: [{endpoints}]\n"
        + textwrap.indent(textwrap.dedent(upstream), "    ")
        + textwrap.indent(textwrap.dedent(extra_upstreams), "  ")
        + "routes:\n  - name: r\n    upstream: g\n    grpc: {}\n"
        + textwrap.indent(textwrap.dedent(route), "    ")
    )


@dataclass
class Answer:
    initial: dict
    messages: list
    code: str
    details: str
    trailing: dict

    @property
    def texts(self) -> list[str]:
        return [token(m).text for m in self.messages]


async def call(
    target: str,
    method: str = STREAM,
    raw: bytes | None = None,
    metadata: tuple = (),
    timeout: float | None = 10,
    **fields,
) -> Answer:
    """One server-streaming call through `target` (host:port), read to its end."""
    async with aio.insecure_channel(target) as channel:
        body = raw if raw is not None else request(**fields)
        rpc = channel.unary_stream(method)(body, metadata=metadata, timeout=timeout)
        messages = []
        try:
            async for message in rpc:
                messages.append(message)
        except aio.AioRpcError:
            pass  # the status is read below, as for a call that ended well
        return Answer(
            dict(await rpc.initial_metadata() or ()),
            messages,
            (await rpc.code()).name,
            await rpc.details() or "",
            dict(await rpc.trailing_metadata() or ()),
        )
