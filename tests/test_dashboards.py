"""The shipped Grafana dashboard and Prometheus alerts: valid, tested, and about real metrics.

``promtool`` (Debian package ``prometheus``) runs the alert rules' unit tests;
without it these tests skip with one line, except under ``CI=true`` where a
missing promtool is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from agent.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus" / "callgate-alerts.yml"
RULE_TESTS = ROOT / "config" / "prometheus" / "callgate-alerts.test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "callgate-dashboard.json"
#: names a query may use that Prometheus itself provides, not the agent.
PROMETHEUS_OWN = {"up"}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found (apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI requires it", pytrace=False)
        pytest.skip(message)
    return found


def _yaml(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


def _walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    queries = [v for k, v in _walk(board["panels"]) if k == "expr"]
    queries += [v for k, v in _walk(board["templating"]) if k == "definition"]
    return queries


def rule_queries() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in _yaml(RULES)["groups"] for r in g["rules"]}


def exported_names() -> set[str]:
    """Every sample name the daemon's registry can export, from its metric families."""
    metrics = Metrics()

    class Publisher:
        depth = dropped = published = 0
        connected = True

    metrics.watch_publisher(Publisher())
    metrics.watch_gate_listener(lambda: None)
    metrics.watch_accounts({"acme": Decimal(1)}, dict)
    names = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ("_total", "_created"), "histogram": (
            "_bucket", "_sum", "_count", "_created"), "gauge": ("",)}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


_METRIC = re.compile(r"\b(callgate_[a-z0-9_]+|up)\b(?!\s*\()")


def _names_in(query: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', query)
    return set(_METRIC.findall(without_strings))


def test_queries_use_only_metrics_the_daemon_exports() -> None:
    exported = exported_names() | PROMETHEUS_OWN
    used: dict[str, set[str]] = {}
    for query in [*dashboard_queries(), *rule_queries().values()]:
        for name in _names_in(query):
            used.setdefault(name, set()).add(query)
    assert len(used) > 15  # the extraction found the queries at all
    unknown = {n: q for n, q in used.items() if n not in exported}
    assert not unknown, f"queries use metrics the daemon does not export: {unknown}"


def test_the_name_check_catches_a_misspelt_metric() -> None:
    assert "callgate_pbx_conected" not in exported_names()
    assert _names_in('sum(rate(callgate_pbx_conected{reason="callgate_x"}[5m]))') == {
        "callgate_pbx_conected"}


def test_the_dashboard_shows_what_ops_need() -> None:
    board = json.loads(DASHBOARD.read_text())
    text = " ".join(dashboard_queries())
    for needed in ("callgate_decisions_total", "callgate_live_calls", "callgate_cutoffs_total",
                   "callgate_cutoff_lateness_seconds_bucket",
                   "callgate_account_available_balance", "callgate_pbx_connected",
                   "callgate_ledger_operation_seconds_bucket", "callgate_mqtt_buffer_depth"):
        assert needed in text, needed
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in board["panels"])


def test_every_alert_has_a_firing_and_a_silent_promtool_case() -> None:
    fires, silent = set(), set()
    for case in _yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = set(rule_queries())
    assert alerts == fires == silent
    assert {"CallgatePbxDisconnected", "CallgateLedgerUnavailable", "CallgatePolicyReloadRefused",
            "CallgateCutoffLate", "CallgateMqttEventsDropped", "CallgateAccountLowBalance",
            "CallgateAccountOutOfBalance"} <= alerts


def test_the_readme_explains_every_alert() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Operating callgate", 1)[1].split("\n## ", 1)[0]
    for alert in rule_queries():
        assert alert in section, alert


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = _promtool()
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True,
                            text=True, timeout=120, cwd=RULE_TESTS.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule promtool parses."""
    promtool = _promtool()
    rules = [{"record": f"callgate:dashboard_query:{i}",
              "expr": q.replace("$__rate_interval", "5m").replace("$instance", ".*")}
             for i, q in enumerate(dashboard_queries()) if not q.startswith("label_values(")]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
