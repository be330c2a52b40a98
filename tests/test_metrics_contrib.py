# SPDX-License-Identifier: GPL-3.0-or-later
"""contrib/: the Prometheus alerting rules pass ``promtool check rules``, each alert has a unit
test that ``promtool test rules`` runs (and one that fails when a rule is broken), and every
Grafana panel queries only metrics the server exports.  That the panels' queries evaluate on a
real Prometheus scraping a real server is in tests/test_metrics.py."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from peers.prometheus import promtool

CONTRIB = Path(__file__).resolve().parent.parent / "contrib"
RULES = CONTRIB / "prometheus" / "mandos-alerts.yml"
RULE_TESTS = CONTRIB / "prometheus" / "mandos-alerts.test.yml"
DASHBOARD = CONTRIB / "grafana" / "mandos-dashboard.json"
README = Path(__file__).resolve().parent.parent / "README.md"


def _alerts() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.MULTILINE)


def _documented_metrics() -> set[str]:
    """The metric names in the README's table of metrics."""
    return set(re.findall(r"^\| `(mandos_[a-z_]+)`", README.read_text(), re.MULTILINE))


@pytest.mark.peers  # promtool (Debian's prometheus)
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


@pytest.mark.peers  # promtool (Debian's prometheus)
def test_every_alert_has_a_unit_test_and_they_pass() -> None:
    tested = set(re.findall(r"^\s+alertname: (\w+)$", RULE_TESTS.read_text(), re.MULTILINE))
    assert tested == set(_alerts())
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.peers  # promtool (Debian's prometheus)
def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The tests can fail: with the unknown-key alert watching the wrong reason, they do."""
    shutil.copy(RULE_TESTS, tmp_path)
    (tmp_path / RULES.name).write_text(
        RULES.read_text().replace('reason="unknown_key"', 'reason="disabled"'))
    result = promtool("test", "rules", tmp_path / RULE_TESTS.name)
    assert result.returncode != 0
    assert "MandosUnknownKeysKnocking" in result.stdout + result.stderr


def test_rules_and_dashboard_use_only_documented_metrics() -> None:
    documented = _documented_metrics()
    assert documented, "README has no table of metrics"
    used = set(re.findall(r"\bmandos_[a-z_]+", RULES.read_text() + DASHBOARD.read_text()))
    assert used <= documented | {f"{name}_total" for name in documented}, \
        used - documented


def test_the_dashboard_is_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(target["expr"] for target in panel["targets"])
