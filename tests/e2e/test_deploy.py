"""deploy/: the Prometheus config and rules pass promtool (run once, in the e2e session:
the rules do not depend on the Python version)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
PROM = os.path.join(ROOT, "deploy", "prometheus")


def promtool(*args: str) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool not found: install the Debian package prometheus", pytrace=False)
    p = subprocess.run([exe, *args], cwd=PROM, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def test_rules_are_valid_and_lint_clean() -> None:
    out = promtool("check", "rules", "rules.yml", "thresholds.yml")
    assert "SUCCESS: 30 rules found" in out and "SUCCESS: 5 rules found" in out


def test_rules_unit_tests_pass() -> None:
    assert "SUCCESS" in promtool("test", "rules", "tests/rules_test.yml")


def test_example_prometheus_config_is_valid() -> None:
    assert "SUCCESS: 2 rule files found" in promtool("check", "config", "prometheus.yml")


def test_example_prometheus_config_sends_alerts_to_an_alertmanager() -> None:
    with open(os.path.join(PROM, "prometheus.yml")) as f:
        assert '"alertmanager:9093"' in f.read()
