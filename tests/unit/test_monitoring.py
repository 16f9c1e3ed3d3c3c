"""deploy/prometheus and deploy/grafana against Prometheus' own tools and streams.metrics.

``promtool`` comes from Debian's prometheus package, installed when missing
(:func:`streams.devtools.localprometheus.ensure_installed`, as ``./dev test``
does); no Prometheus server runs here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from streams import metrics
from streams.devtools import localprometheus

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "paystream.json"

#: A paystream series name in an expression.
SERIES = re.compile(r"\bpaystream_[a-z0-9_]+\b")
#: The alerts the issue asks for: lag growing, dead letters, deadline lag, a breaker open.
REQUIRED_ALERTS = {"PaystreamConsumerLagGrowing", "PaystreamDeadLetters", "PaystreamDeadlineLagHigh",
                   "PaystreamCircuitBreakerOpen"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return localprometheus.ensure_installed()["promtool"]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"]
            for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def test_the_alert_rules_pass_promtool_check_rules(promtool: str) -> None:
    result = localprometheus.check_rules(ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout
    assert REQUIRED_ALERTS <= {rule["alert"] for rule in alert_rules()}


def test_each_alert_fires_on_its_series_and_only_then(promtool: str) -> None:
    """``promtool test rules``: the cases in alerts_test.yml (fires, stays quiet, clears)."""
    import subprocess

    result = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=ALERTS.parent,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {alert["alertname"] for case in yaml.safe_load((ALERTS.parent / "alerts_test.yml").read_text())
              ["tests"] for alert in case["alert_rule_test"]}
    assert REQUIRED_ALERTS <= tested


def test_the_scrape_config_passes_promtool_check_config(promtool: str) -> None:
    result = localprometheus.check_config(DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_series_in_the_alerts_and_the_dashboard_exists() -> None:
    known = metrics.all_metric_names()
    exprs = [(rule["alert"], rule["expr"]) for rule in alert_rules()] + dashboard_exprs()
    for where, expr in exprs:
        named = set(SERIES.findall(expr))
        if where == "PaystreamTargetDown":
            continue  # Prometheus' own up series
        assert named, f"{where}: {expr!r} names no paystream series"
        assert named <= known, f"{where}: {sorted(named - known)} are not metrics of streams.metrics"


def test_every_dashboard_expr_is_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each query as a recording rule: ``promtool check rules`` parses it."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"paystream:dashboard:{index}", "expr": expr.replace("$__rate_interval", "5m")}
        for index, (_title, expr) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = localprometheus.check_rules(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(exprs) >= 20


def test_the_dashboard_covers_every_metric_family() -> None:
    """Every family of streams.metrics has a panel (the issue's list, one place to look)."""
    shown = {name for _title, expr in dashboard_exprs() for name in SERIES.findall(expr)}
    families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in metrics.all_metric_names()}
    shown_families = {re.sub(r"_(bucket|count|sum)$", "", name) for name in shown}
    assert families <= shown_families, sorted(families - shown_families)


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    board = json.loads(DASHBOARD.read_text())
    source = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [datasource] = source["datasources"]
    uids = {target["datasource"]["uid"] for panel in board["panels"] for target in panel.get("targets", [])}
    assert uids == {datasource["uid"]}
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/paystream.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
