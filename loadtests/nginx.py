"""nginx as the reference C proxy, and as a near-free upstream: Debian's package, a generated
config, a non-daemon child.

The proxy config is the one an operator would write for token streams: `proxy_buffering off`,
HTTP/1.1 with kept-alive upstream connections, one worker process (the gateway is one
process on one core too), and no access log unless asked (the gateway's is compared both
ways). It listens on a free 127.0.0.1 port, with its pid file, logs and temp files in the
run's temp directory, and is stopped with the other children.

The upstream config (`sse_conf`) answers every request with one fixed SSE body (`return 200`,
`text/event-stream`): what fake-llm sends, at a small fraction of its CPU per stream, so a
scenario can load the proxy rather than the upstream.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import aiohttp

from .procs import Child, ProcessGroup, free_port

HEALTH_PATH = "/__nginx_health"


def available() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
    )


def _head(prefix: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the temp dirs
    return f"""\
{user}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
"""


def nginx_conf(prefix: Path, port: int, upstream_port: int, access_log: bool = False) -> str:
    log = f"access_log {prefix}/access.log;" if access_log else "access_log off;"
    return _head(prefix) + f"""\
http {{
    {log}
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream llm {{
        server 127.0.0.1:{upstream_port};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {HEALTH_PATH} {{ return 200 "ok"; }}
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"""


def sse_conf(prefix: Path, port: int, body: bytes) -> str:
    """nginx answering every request (any method, any path) with `body` as an SSE stream.
    A config token holds at most 4 KiB, so the body is spelled as constant `map` pieces."""
    text = body.decode()
    pieces = [text[i:i + 500] for i in range(0, len(text), 500)]  # ≤ 2 KiB quoted
    maps = "".join(f'    map "" $sse{i} {{ default "{_quoted(piece)}"; }}\n'
                   for i, piece in enumerate(pieces))
    answer = "".join(f"$sse{i}" for i in range(len(pieces)))
    return _head(prefix) + f"""\
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    geo $dollar {{ default "$"; }}
{maps}    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = {HEALTH_PATH} {{ return 200 "ok"; }}
        location / {{
            default_type text/event-stream;
            add_header Cache-Control no-cache;
            return 200 "{answer}";
        }}
    }}
}}
"""


def _quoted(text: str) -> str:
    """`text` inside an nginx double-quoted string (where `$name` would be a variable)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text.replace("$", "${dollar}")


async def start_nginx(
    group: ProcessGroup, workdir: Path, upstream_port: int, cpus: frozenset[int] | None
) -> tuple[Child, int]:
    """Start nginx in front of 127.0.0.1:`upstream_port`; (its child, its port)."""
    prefix = workdir / f"nginx-{upstream_port}"
    port = free_port()
    return await _start(group, prefix, nginx_conf(prefix, port, upstream_port), port, cpus,
                        "nginx")


async def start_sse(
    group: ProcessGroup, workdir: Path, body: bytes, cpus: frozenset[int] | None
) -> tuple[Child, int]:
    """Start nginx answering every request with the SSE `body`; (its child, its port)."""
    port = free_port()
    prefix = workdir / f"nginx-sse-{port}"
    return await _start(group, prefix, sse_conf(prefix, port, body), port, cpus, "nginx-sse")


async def _start(group: ProcessGroup, prefix: Path, text: str, port: int,
                 cpus: frozenset[int] | None, name: str) -> tuple[Child, int]:
    binary = available()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (apt-get install nginx)")
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    url = f"http://127.0.0.1:{port}{HEALTH_PATH}"

    async def ready(child: Child) -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = await group.spawn(name, argv, cpus=cpus, announce=None, ready=ready)
    return child, port
