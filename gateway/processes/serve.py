"""`streamgate serve`: load the config, then run one gateway or a supervisor of several."""

from __future__ import annotations

import asyncio
import sys

from gateway.app import Gateway
from gateway.config.loader import load_config
from gateway.errors import ConfigErrors
from gateway.processes.run import Serving, configure_logging, install_event_loop_policy, run
from gateway.processes.supervisor import Supervisor


def serve(config_path: str, workers: int | None = None) -> int:
    """Run the gateway on `config_path`; `workers` overrides `server.workers`."""
    configure_logging()
    try:
        config = load_config(config_path, workers=workers)
    except ConfigErrors as errors:
        print(errors, file=sys.stderr)
        return 1
    if config.server.workers > 1:
        target: Serving = Supervisor(config_path, config)
        processes = f", {config.server.workers} serving processes"
    else:
        target, processes = Gateway(config_path, config), ""

    def announce(proxy_url: str, admin_url: str) -> None:
        grpc = getattr(target, "grpc", None)  # a lone gateway's listener knows its port
        where = grpc.address if grpc is not None else config.server.grpc_listen
        grpc = f" (grpc {where})" if where else ""
        print(
            f"streamgate listening on {proxy_url} (admin {admin_url}){grpc}{processes}",
            flush=True,
        )

    install_event_loop_policy()
    return asyncio.run(run(target, announce, config.server.shutdown_grace))
