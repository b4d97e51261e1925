"""`streamgate schema`: the JSON Schema editors use (yaml-language-server) agrees with the loader.

Checked with a real validator (`jsonschema`, draft 2020-12): every shipped config passes and
names the schema in its first line; what `streamgate validate` rejects for unknown keys,
missing keys and wrong types the schema rejects too; the shipped schema file is what the
generator prints today.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.config.loader import load_config_text
from gateway.config.model import ServerConfig
from gateway.config.routes import Timeouts
from gateway.config.schema import config_schema
from gateway.config.yaml_nodes import _Yaml12Loader
from gateway.errors import ConfigErrors

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "config" / "streamgate.schema.json"
SHIPPED = sorted([*ROOT.glob("config/*.yaml"), *ROOT.glob("config/examples/*.yaml")])
MODELINE = "# yaml-language-server: $schema="


def as_editor_reads(text: str) -> object:
    """YAML 1.2 data, as yaml-language-server (and the gateway) read plain scalars."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def schema_errors(data: object) -> list[str]:
    validator = jsonschema.Draft202012Validator(config_schema())
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


def test_schema_is_valid_draft_2020_12():
    schema = config_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_shipped_schema_file_is_up_to_date():
    shipped = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert shipped == config_schema(), "regenerate: streamgate schema > config/streamgate.schema.json"


def test_cli_prints_the_schema():
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "schema"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == config_schema()


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_shipped_config_names_the_schema_and_passes_it(path: Path):
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith(MODELINE), f"{path.name}: first line must be the schema modeline"
    assert (path.parent / first.removeprefix(MODELINE)).resolve() == SCHEMA_FILE
    assert schema_errors(as_editor_reads(text)) == []


def test_every_field_carries_its_documentation_and_default():
    defs = config_schema()["$defs"]
    gap = defs["Timeouts"]["properties"]["chunk_gap"]
    assert "silence" in gap["description"] and gap["default"] == "30s"
    grace = defs["ServerConfig"]["properties"]["shutdown_grace"]
    assert grace["default"] == "5m" and "SIGTERM" in grace["description"]
    assert defs["ServerConfig"]["properties"]["listen"]["default"] == "0.0.0.0:8080"
    assert defs["BufferConfig"]["properties"]["bytes"]["default"] == "1MiB"
    assert "seconds" in defs["duration"]["description"]
    every_object = [d for d in defs.values() if d.get("type") == "object"]
    assert every_object and all(d["additionalProperties"] is False for d in every_object)


def test_written_defaults_load_as_the_dataclass_defaults():
    """The defaults the schema shows, written into a config, load to the declared values."""
    defs = config_schema()["$defs"]
    t, s = defs["Timeouts"]["properties"], defs["ServerConfig"]["properties"]
    timeouts = ", ".join(f"{k}: {t[k]['default']}" for k in ("queue", "first_chunk", "total"))
    config = load_config_text(
        BASE + f"server: {{shutdown_grace: {s['shutdown_grace']['default']}, "
        f"max_request_body: {s['max_request_body']['default']}}}\n"
        + f"routes:\n  - {{name: r, upstream: up, timeouts: {{{timeouts}}}}}\n",
        "t.yaml",
        env={},
    )
    assert config.server == ServerConfig(listen=config.server.listen)
    assert config.routes[0].timeouts == Timeouts()


BASE = "upstreams:\n  up: {kind: http, endpoints: [{url: 'http://127.0.0.1:1'}]}\n"
GOOD_ROUTE = "routes:\n  - {name: r, upstream: up, timeouts: {queue: 250ms}}\n"

# (what is wrong, config text): `streamgate validate` rejects each, and so must the schema.
REJECTED = [
    ("unknown-top-level-key", BASE + GOOD_ROUTE + "sever: {listen: ':8080'}\n"),
    ("unknown-nested-key", BASE + "routes:\n  - {name: r, upstream: up, timeouts: {firstchunk: 5s}}\n"),
    ("unknown-upstream-key", "upstreams:\n  up: {kind: http, endpoints: [{url: u}], balanse: weighted}\n" + GOOD_ROUTE),
    ("string-for-integer", BASE + GOOD_ROUTE + "limits: {concurrency: {gpu: {capacity: lots}}}\n"),
    ("bad-duration", BASE + "routes:\n  - {name: r, upstream: up, timeouts: {queue: 5 seconds}}\n"),
    ("bad-size", BASE + GOOD_ROUTE + "server: {max_request_body: 4 megs}\n"),
    ("bad-literal", BASE + GOOD_ROUTE + "state: {backend: etcd}\n"),
    ("yaml11-boolean-is-not-a-literal", BASE + GOOD_ROUTE + "telemetry: {access_log: true}\n"),
    ("list-for-mapping", BASE + GOOD_ROUTE + "admin: [127.0.0.1:9901]\n"),
    ("mapping-for-list", BASE + "routes: {name: r, upstream: up}\n"),
    ("missing-required-key", BASE + "routes:\n  - {name: r}\n"),
    ("missing-routes", BASE),
    ("bad-address", BASE + GOOD_ROUTE + "server: {listen: localhost}\n"),
    ("string-for-boolean", BASE + "routes:\n  - {name: r, upstream: up, retry: {backoff: {jitter: yes}}}\n"),
]


@pytest.mark.parametrize("text", [t for _, t in REJECTED], ids=[w for w, _ in REJECTED])
def test_schema_rejects_what_validate_rejects(text: str):
    with pytest.raises(ConfigErrors):
        load_config_text(text, "t.yaml", env={})
    assert schema_errors(as_editor_reads(text)), "the schema accepted it"


ACCEPTED = [
    ("minimal", BASE + GOOD_ROUTE),
    ("env-reference-in-an-integer", BASE + GOOD_ROUTE + "limits: {concurrency: {gpu: {capacity: '${CAP:-8}'}}}\n"),
    ("bare-seconds", BASE + "routes:\n  - {name: r, upstream: up, timeouts: {queue: 5}}\n"),
    ("fallback-shorthand-and-mapping", BASE + "  b: {kind: http, endpoints: [{url: 'http://127.0.0.1:2'}]}\n"
     + "routes:\n  - {name: r, upstream: up, fallbacks: [b, {upstream: b, model: m}]}\n"),
    ("worker-pool-without-kind", "upstreams:\n  w: {command: [x, '{port}'], count: 1}\n"
     + "routes:\n  - {name: r, upstream: w}\n"),
    ("retry-on-key-is-a-string", BASE + "routes:\n  - {name: r, upstream: up, retry: {on: [429, reset]}}\n"),
]


@pytest.mark.parametrize("text", [t for _, t in ACCEPTED], ids=[w for w, _ in ACCEPTED])
def test_schema_accepts_what_validate_accepts(text: str):
    load_config_text(text, "t.yaml", env={})
    assert schema_errors(as_editor_reads(textwrap.dedent(text))) == []
