"""The Prometheus alert rules are valid (`promtool check rules`) and fire when they should (`promtool test rules`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "helm/llm-cluster/files/alert-rules.yaml"
RULE_TESTS = ROOT / "tests/prometheus/alert-rules.test.yaml"


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: scripts/install_prometheus.sh installs it"
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_rules_are_valid():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0 and "SUCCESS: 5 rules found" in result.stdout, result.stdout + result.stderr


ALERTS = [
    "LLMClusterHighErrorRate",
    "LLMClusterRejectingRequests",
    "LLMClusterTTFTSLOBreach",
    "LLMClusterKVCacheSaturated",
    "LLMClusterNoHealthyReplicas",
]


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_has_a_unit_test(alert):
    assert f"alertname: {alert}" in RULE_TESTS.read_text()


def test_rules_fire_when_they_should():
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
