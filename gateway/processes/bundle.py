"""What a supervisor hands its serving processes: one JSON file, replaced atomically.

It holds the config *text* the supervisor validated, not the path: a process that restarts
after a rejected reload must come back on the config the others serve, not on the broken file
on disk. Beside it: the file's name (for error messages), the process count, the listen port
(resolved by the supervisor when the config says 0), and the URLs of the worker pools the
supervisor runs. Each process builds its own share of the config from it (config/processes.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config.loader import load_config_text
from gateway.config.model import GatewayConfig
from gateway.config.processes import for_process
from gateway.errors import ConfigError, ConfigErrors


@dataclass(frozen=True)
class Bundle:
    text: str
    source: str
    workers: int
    port: int
    worker_urls: Mapping[str, list[str]] = field(default_factory=dict)

    def write(self, path: Path) -> None:
        """Replace the file at `path` at once: a process starting meanwhile reads either."""
        temporary = path.with_suffix(".new")
        temporary.write_text(json.dumps(self.__dict__))
        os.replace(temporary, path)

    @classmethod
    def read(cls, path: str) -> Bundle:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            message = f"cannot read the supervisor's config: {exc}"
            raise ConfigErrors([ConfigError(path, 1, 1, "", message)]) from None

    def config(self, index: int, admin_port: int) -> GatewayConfig:
        """Serving process `index`'s config (raises ConfigErrors, as loading the file would)."""
        whole = load_config_text(self.text, self.source, workers=self.workers)
        return for_process(whole, index, self.port, admin_port, self.worker_urls)
