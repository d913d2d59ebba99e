"""deploy/observability: the dashboard and alert rules name only metrics the code exports.

The full validation (promtool included) is deploy/observability/validate.sh; these tests run
its checks in the test suite, promtool's parts when a promtool is at hand.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from types import ModuleType

import pytest
from prometheus_client import REGISTRY

import services.billing.handlers
import services.billing.jobs
import shared.metrics
from tests.support import ROOT

OBSERVABILITY = ROOT / "deploy" / "observability"
assert shared.metrics and services.billing.handlers and services.billing.jobs  # registered


def load_checks() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "check_observability", OBSERVABILITY / "check_observability.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def promtool() -> str | None:
    local = ROOT / ".infra" / "tools" / "promtool" / "usr" / "bin" / "promtool"
    return shutil.which("promtool") or (str(local) if local.exists() else None)


def test_dashboard_and_alert_rules_name_only_metrics_the_code_exports() -> None:
    checks = load_checks()
    assert checks.check_all(promtool=None) == []
    # the checker's reading of the code finds exactly the metrics the processes register
    registered = {
        family.name for family in REGISTRY.collect() if family.name.startswith("grantwire_")
    }
    assert set(checks.exported_samples().values()) == registered


def test_the_checks_report_unknown_metrics_panels_without_datasource_and_untested_alerts() -> None:
    checks = load_checks()
    samples = checks.exported_samples()
    assert checks.check_metric_names({"rules": "rate(grantwire_messages_total[5m])"}, samples) == []
    assert checks.check_metric_names({"rules": "grantwire_mesages_total"}, samples) == [
        "rules: grantwire_mesages_total is not exported by the code"
    ]
    dashboard = {
        "uid": "x",
        "title": "x",
        "schemaVersion": 39,
        "templating": {"list": [{"name": "datasource"}]},
        "panels": [
            {
                "id": 1,
                "type": "timeseries",
                "title": "Throughput",
                "gridPos": {"h": 1, "w": 1, "x": 0, "y": 0},
                "targets": [{"refId": "A", "expr": "up"}],
            }
        ],
    }
    assert checks.check_dashboard(dashboard) == [
        f"panel 1 ('Throughput'): datasource is not {checks.DATASOURCE}"
    ]
    assert checks.check_alert_tests("  - alert: A\n  - alert: B\n", "alertname: A") == [
        "alert B: no test in prometheus-rules.test.yaml"
    ]


@pytest.mark.skipif(
    promtool() is None, reason="no promtool: deploy/observability/validate.sh installs it"
)
def test_alert_rules_pass_promtool_and_their_unit_tests_and_the_dashboard_promql_parses() -> None:
    tool = promtool()
    assert tool is not None
    for command in (
        ["check", "rules", "prometheus-rules.yaml"],
        ["test", "rules", "prometheus-rules.test.yaml"],
        ["check", "config", "prometheus.yaml"],
    ):
        result = subprocess.run(
            [tool, *command], cwd=OBSERVABILITY, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    checks = load_checks()
    assert checks.check_all(promtool=tool) == []
    broken = checks.check_promql([("panel 1 A", "sum by (service (grantwire_ready)")], tool)
    assert len(broken) == 1 and "parse error" in broken[0]
