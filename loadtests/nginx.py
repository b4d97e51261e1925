"""nginx as the reference C proxy: Debian's package, a generated config, a non-daemon child.

The config is the one an operator would write for token streams: `proxy_buffering off`,
HTTP/1.1 with kept-alive upstream connections, one worker process (the gateway is one
process on one core too), and no access log unless asked (the gateway's is compared both
ways). It listens on a free 127.0.0.1 port, with its pid file, logs and temp files in the
run's temp directory, and is stopped with the other children.
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


def nginx_conf(prefix: Path, port: int, upstream_port: int, access_log: bool = False) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the temp dirs
    log = f"access_log {prefix}/access.log;" if access_log else "access_log off;"
    return f"""\
{user}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
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


async def start_nginx(
    group: ProcessGroup, workdir: Path, upstream_port: int, cpus: frozenset[int] | None
) -> tuple[Child, int]:
    """Start nginx in front of 127.0.0.1:`upstream_port`; (its child, its port)."""
    binary = available()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (apt-get install nginx)")
    prefix = workdir / f"nginx-{upstream_port}"
    prefix.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, port, upstream_port))
    url = f"http://127.0.0.1:{port}{HEALTH_PATH}"

    async def ready(child: Child) -> bool:
        try:
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = await group.spawn("nginx", argv, cpus=cpus, announce=None, ready=ready)
    return child, port
