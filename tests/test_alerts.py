"""The alert rules (helm/streamgate/alerts/streamgate.rules.yaml), checked by Prometheus' own
promtool: the file passes `promtool check rules`; the unit tests in tests/alerts/ pass, and
they make every alert fire on a failing series and stay silent on healthy traffic; each rule
names only metrics the gateway exports (or another branch adds, by agreed name); and the
chart's PrometheusRule carries the same rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.spec_metrics import DOCUMENTED_ADDITIONS, SPEC_SECTION_6
from tests.support.tools import require_tool
from tests.test_dashboard import EXPORTED, metric_names

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm/streamgate/alerts/streamgate.rules.yaml"
UNIT_TESTS = ROOT / "tests/alerts/streamgate.rules.test.yaml"
EXPECTED_ALERTS = {
    "StreamgateStreamErrorRatioHigh",
    "StreamgateTimeToFirstChunkP99High",
    "StreamgateUpstreamEjections",
    "StreamgateUpstreamPanicMode",
    "StreamgateWorkerCrashLoop",
    "StreamgateSharedStateDegraded",
    "StreamgateRateLimitedShareHigh",
}


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require_tool("promtool"), *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_promtool_check_rules_passes():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_can_fail(tmp_path: Path):
    """The unit tests notice a broken rule: with the error ratio threshold raised tenfold,
    the alert no longer fires where the tests expect it."""
    broken = tmp_path / "broken.rules.yaml"
    broken.write_text(RULES.read_text().replace("> 0.05", "> 0.5"))
    tests = tmp_path / "broken.test.yaml"
    tests.write_text(UNIT_TESTS.read_text().replace("../../helm/streamgate/alerts/streamgate.rules.yaml", str(broken)))
    result = promtool("test", "rules", str(tests))
    assert result.returncode != 0
    assert "StreamgateStreamErrorRatioHigh" in result.stdout + result.stderr


def test_the_promised_alerts_are_there_with_severity_and_text():
    found = {r["alert"]: r for r in rules()}
    assert found.keys() == EXPECTED_ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_alert_fires_in_one_unit_test_and_stays_silent_in_another():
    fired, silent = set(), set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == EXPECTED_ALERTS
    assert silent == EXPECTED_ALERTS


@pytest.mark.parametrize("rule", rules(), ids=[r["alert"] for r in rules()])
def test_alerts_name_only_exported_or_agreed_metrics(rule: dict):
    names = metric_names(rule["expr"])
    assert names
    unknown = names - EXPORTED.keys()
    assert not unknown, f"not exported: {sorted(unknown)}"
    bases = {EXPORTED.get(n, n) for n in names}
    assert bases <= SPEC_SECTION_6 | DOCUMENTED_ADDITIONS


def test_the_chart_prometheus_rule_is_rendered_from_the_same_file():
    template = (ROOT / "helm/streamgate/templates/prometheusrule.yaml").read_text()
    assert '.Files.Get "alerts/streamgate.rules.yaml"' in template
    assert "kind: PrometheusRule" in template
