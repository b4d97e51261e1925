"""The Helm chart as Helm itself renders it (`make helm` fetches the binary; see
tests/support/tools.py): `helm lint --strict` and `helm template` in every documented mode,
then the rendered objects are read like a cluster would: probes hit paths the admin listener
serves, the ConfigMap's gateway.yaml passes `streamgate validate`, the pod outlives the drain,
the sidecar sits beside a model server it can reach, and the monitoring objects select what
the chart renders. A template error fails the render, and so the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway.admin.server import admin_app
from gateway.config.loader import load_config
from gateway.config.model import GatewayConfig, WorkerPoolUpstream
from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "streamgate"
RELEASE, NAMESPACE = "llm-gw", "llm"
FULLNAME = f"{RELEASE}-streamgate"


@dataclass(frozen=True)
class Mode:
    """One documented way to install the chart: values files and --set overrides."""

    id: str
    values: tuple[str, ...]
    sets: tuple[str, ...] = ()
    sidecar: bool = False
    """A model server shares the gateway's pod."""
    redis: bool = False
    service_monitor: bool = False
    prometheus_rule: bool = False

    def args(self) -> list[str]:
        args = []
        for name in self.values:
            args += ["-f", str(CHART / name)]
        for assignment in self.sets:
            args += ["--set", assignment]
        return args


MODES = [
    Mode("defaults", ()),
    Mode(
        "ingress-redis-monitoring",
        ("values-ingress.yaml",),
        redis=True,
        service_monitor=True,
        prometheus_rule=True,
    ),
    Mode(
        "sidecar",
        ("values-sidecar.yaml",),
        ("serviceMonitor.enabled=true",),
        sidecar=True,
        service_monitor=True,
    ),
    Mode(
        "sidecar-redis",
        ("values-sidecar.yaml",),
        (
            "redis.url=redis://redis.llm.svc:6379/0",
            "config.state.backend=redis",
            "config.limits.concurrency.gpu.scope=global",
            "prometheusRule.enabled=true",
        ),
        sidecar=True,
        redis=True,
        prometheus_rule=True,
    ),
    Mode("app-sidecar", ("values-app-sidecar.yaml",), service_monitor=True),
]
SIDECAR_MODES = [m for m in MODES if m.sidecar]


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("helm"), *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


class Rendered:
    """`helm template` output, by kind."""

    def __init__(self, text: str) -> None:
        self.objects = [d for d in yaml.safe_load_all(text) if d]

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        (found,) = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        return found

    def deployment(self) -> dict | None:
        found = self.all("Deployment")
        return found[0] if found else None


_cache: dict[str, Rendered] = {}


@pytest.fixture(params=MODES, ids=[m.id for m in MODES])
def mode(request) -> Mode:
    return request.param


@pytest.fixture
def rendered(mode: Mode) -> Rendered:
    if mode.id not in _cache:
        result = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *mode.args())
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        _cache[mode.id] = Rendered(result.stdout)
    return _cache[mode.id]


def admin_get_paths() -> set[str]:
    """The paths the admin listener really serves to GET (from its router, not a list)."""
    app = admin_app(None)
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET"}


def streamgate_container(pod_spec: dict) -> dict:
    containers = pod_spec.get("initContainers", []) + pod_spec["containers"]
    (found,) = [c for c in containers if c["name"] == "streamgate"]
    return found


def pod_spec(rendered: Rendered) -> dict:
    """The gateway's pod: the chart's Deployment, or the documented app-sidecar example."""
    deployment = rendered.deployment()
    if deployment is None:
        deployment = yaml.safe_load((CHART / "examples/sidecar-deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]


def gateway_yaml(rendered: Rendered) -> str:
    return rendered.one("ConfigMap", FULLNAME)["data"]["gateway.yaml"]


def loaded_config(rendered: Rendered, tmp_path: Path) -> GatewayConfig:
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(rendered))
    return load_config(str(path), env=container_env(rendered))


def container_env(rendered: Rendered) -> dict[str, str]:
    """The env the pod gives the gateway (values stand in for Secret references)."""
    env = streamgate_container(pod_spec(rendered)).get("env", [])
    return {e["name"]: e.get("value", f"from-secret-{e['name'].lower()}") for e in env}


# --------------------------------------------------------------------------- the tools


def test_helm_lint_passes(mode: Mode):
    result = helm("lint", "--strict", str(CHART), *mode.args())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_a_template_error_fails_the_render():
    """The chart refuses keys it owns, and `helm template` exits non-zero saying why."""
    result = helm("template", RELEASE, str(CHART), "--set", "config.server.listen=0.0.0.0:1")
    assert result.returncode != 0
    assert "config.server.listen is set by the chart" in result.stderr


def test_objects_are_well_formed(rendered: Rendered):
    seen = set()
    for obj in rendered.objects:
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], obj
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"two {key}"
        seen.add(key)
    assert ("ConfigMap", FULLNAME) in seen


# --------------------------------------------------------------------------- the gateway pod


def test_probes_point_at_paths_the_admin_listener_serves(rendered: Rendered, tmp_path: Path):
    spec = pod_spec(rendered)
    container = streamgate_container(spec)
    admin_port = loaded_config(rendered, tmp_path).admin.listen[1]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    served = admin_get_paths()
    expected = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        if probe not in container and rendered.deployment() is None:
            continue  # the app-sidecar example leaves startup to the native sidecar ordering
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in served, probe
        assert ports[get["port"]] == admin_port, f"{probe} does not reach the admin listener"


def test_helm_test_pod_asks_the_admin_service_for_readyz(rendered: Rendered):
    pod = rendered.one("Pod")
    url = pod["spec"]["containers"][0]["command"][-1]
    match = re.fullmatch(r"http://([\w.-]+):(\d+)(/\w+)", url)
    assert match, url
    service = rendered.one("Service", match[1])
    assert int(match[2]) in {p["port"] for p in service["spec"]["ports"]}
    assert match[3] == "/readyz" and match[3] in admin_get_paths()


def test_configmap_config_passes_streamgate_validate(rendered: Rendered, tmp_path: Path):
    path = tmp_path / "gateway.yaml"
    path.write_text(gateway_yaml(rendered))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "validate", str(path)],
        cwd=ROOT,
        env={"PATH": os.environ.get("PATH", ""), **container_env(rendered)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr + path.read_text()


def test_resources_and_security_context_are_set(rendered: Rendered):
    spec = pod_spec(rendered)
    container = streamgate_container(spec)
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    if rendered.deployment() is not None:
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False


def test_pod_outlives_the_gateway_drain(rendered: Rendered, tmp_path: Path):
    """The kubelet SIGKILLs after terminationGracePeriodSeconds, preStop included: it must
    cover preStop, drain delay, shutdown grace and the stopping of worker pools."""
    config = loaded_config(rendered, tmp_path)
    spec = pod_spec(rendered)
    container = streamgate_container(spec)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
    pre_stop_s = int(pre_stop[-1]) if pre_stop and pre_stop[0] == "sleep" else 0
    workers_stop = max(
        (u.stop_grace for u in config.upstreams.values() if isinstance(u, WorkerPoolUpstream)),
        default=0.0,
    )
    drain = pre_stop_s + config.server.drain_delay + config.server.shutdown_grace + workers_stop
    assert spec["terminationGracePeriodSeconds"] > drain


def test_serving_processes_per_pod_are_a_config_value(tmp_path: Path):
    result = helm("template", RELEASE, str(CHART), "--set", "config.server.workers=2")
    assert result.returncode == 0, result.stderr
    assert loaded_config(Rendered(result.stdout), tmp_path).server.workers == 2


def test_config_volume_is_the_rendered_configmap(rendered: Rendered):
    spec = pod_spec(rendered)
    mount = next(
        m for m in streamgate_container(spec)["volumeMounts"] if m["mountPath"] == "/etc/streamgate"
    )
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == FULLNAME
    assert "subPath" not in mount


@pytest.mark.parametrize("mode", SIDECAR_MODES, ids=[m.id for m in SIDECAR_MODES])
def test_sidecar_shares_the_pod_with_a_model_server_it_can_reach(
    rendered: Rendered, mode: Mode, tmp_path: Path
):
    spec = pod_spec(rendered)
    others = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] != "streamgate"]
    (model_server,) = others
    # a native sidecar: it starts before the gateway and stops after the gateway has drained
    assert model_server.get("restartPolicy") == "Always"
    args = " ".join(model_server.get("args", []))
    port = int(re.search(r"--port[= ](\d+)", args)[1])
    assert "--host=127.0.0.1" in args
    config = loaded_config(rendered, tmp_path)
    urls = {e.url for u in config.upstreams.values() for e in getattr(u, "endpoints", ())}
    assert f"http://127.0.0.1:{port}" in urls


def test_redis_url_reaches_the_gateway_from_a_secret(rendered: Rendered, mode: Mode, tmp_path: Path):
    env = streamgate_container(pod_spec(rendered)).get("env", [])
    redis_env = [e for e in env if e["name"] == "REDIS_URL"]
    config = loaded_config(rendered, tmp_path)
    if not mode.redis:
        assert not redis_env and config.state.backend == "memory"
        return
    (entry,) = redis_env
    secret_name = entry["valueFrom"]["secretKeyRef"]["name"]
    assert config.state.backend == "redis"
    assert config.state.redis_url == "from-secret-redis_url"  # ${REDIS_URL:-...} took the env
    secrets = {s["metadata"]["name"] for s in rendered.all("Secret")}
    assert secret_name in secrets or "redis.url" not in " ".join(mode.sets)


# --------------------------------------------------------------------------- services, monitoring


def test_services_select_the_gateway_pods_and_name_real_ports(rendered: Rendered):
    deployment = rendered.deployment()
    for service in rendered.all("Service"):
        selector = service["spec"]["selector"]
        if deployment is not None:
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= labels.items(), service["metadata"]["name"]
            ports = {p["name"]: p["containerPort"] for p in streamgate_container(pod_spec(rendered))["ports"]}
            for port in service["spec"]["ports"]:
                target = port["targetPort"]
                assert target in ports or target in ports.values(), port


def test_service_monitor_scrapes_the_admin_service_metrics(rendered: Rendered, mode: Mode):
    monitors = rendered.all("ServiceMonitor")
    assert len(monitors) == mode.service_monitor
    if not monitors:
        return
    (monitor,) = monitors
    admin = rendered.one("Service", f"{FULLNAME}-admin")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= admin["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in admin["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in admin_get_paths()


def test_dashboard_configmap_holds_the_dashboard(rendered: Rendered):
    configmap = rendered.one("ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards/streamgate.json").read_text())
    assert json.loads(configmap["data"]["streamgate.json"]) == shipped


def test_prometheus_rule_is_the_alerts_file(rendered: Rendered, mode: Mode):
    rules = rendered.all("PrometheusRule")
    assert len(rules) == mode.prometheus_rule
    if not rules:
        return
    (rule,) = rules
    shipped = yaml.safe_load((CHART / "alerts/streamgate.rules.yaml").read_text())
    assert rule["spec"] == shipped
    assert rule["metadata"]["namespace"] == NAMESPACE



def test_each_optional_object_is_on_in_some_mode():
    """So the checks above that depend on it do run."""
    assert any(m.service_monitor for m in MODES) and any(m.prometheus_rule for m in MODES)
    assert any(m.sidecar for m in MODES) and any(m.redis for m in MODES)
