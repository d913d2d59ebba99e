"""Checks of deploy/observability that promtool cannot make (standard library only).

- grafana-dashboard.json: valid JSON, unique panel ids, a grid position and the Prometheus
  datasource variable on every panel and target, an expression on every target;
- the dashboard's and the alert rules' expressions name only metrics the code exports
  (found in the Prometheus metric definitions under shared/ and services/);
- every alert has a unit test in prometheus-rules.test.yaml;
- with ``--promtool PATH``: every dashboard expression parses as PromQL (Grafana's
  variables replaced by sample values, checked by ``promtool check rules``).

    python3 deploy/observability/check_observability.py [--promtool PATH]

Exit 0: no finding; 1: findings (listed on stderr).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DASHBOARD = HERE / "grafana-dashboard.json"
RULES = HERE / "prometheus-rules.yaml"
RULE_TESTS = HERE / "prometheus-rules.test.yaml"
CODE = (ROOT / "shared", ROOT / "services")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
METRIC = re.compile(r"\bgrantwire_[a-z0-9_]+")
DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"(grantwire_[a-z0-9_]+)\"")
SAMPLE_SUFFIXES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_count", "_sum", "_created"),
    "Summary": ("", "_count", "_sum", "_created"),
}
# Sample values for Grafana's variables, so an expression parses as plain PromQL.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${service}": ".*",
    "$service": ".*",
}


def exported_samples(code: tuple[Path, ...] = CODE) -> dict[str, str]:
    """Sample names the code exports -> the metric family that defines them."""
    samples: dict[str, str] = {}
    for folder in code:
        for path in sorted(folder.rglob("*.py")):
            for kind, name in DEFINITION.findall(path.read_text()):
                family = name.removesuffix("_total") if kind == "Counter" else name
                for suffix in SAMPLE_SUFFIXES[kind]:
                    samples[family + suffix] = family
    return samples


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every target and templating query."""
    found = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            found.append((f"panel {panel.get('id')} {target.get('refId')}", target.get("expr", "")))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            found.append((f"variable {variable.get('name')}", query.get("query", "")))
    return found


def check_dashboard(dashboard: dict[str, Any]) -> list[str]:
    problems = []
    for key in ("uid", "title", "panels", "schemaVersion", "templating"):
        if key not in dashboard:
            problems.append(f"dashboard: no {key!r}")
    variables = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in variables:
        problems.append("dashboard: no `datasource` variable (panels use ${datasource})")
    ids = [panel.get("id") for panel in panels(dashboard)]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}, key=str)
    if duplicates:
        problems.append(f"dashboard: duplicate panel ids {duplicates}")
    for panel in panels(dashboard):
        where = f"panel {panel.get('id')} ({panel.get('title')!r})"
        if not {"h", "w", "x", "y"} <= set(panel.get("gridPos", {})):
            problems.append(f"{where}: incomplete gridPos")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != DATASOURCE:
            problems.append(f"{where}: datasource is not {DATASOURCE}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        for target in targets:
            if not target.get("refId") or not target.get("expr"):
                problems.append(f"{where}: a target without refId or expr")
            if target.get("datasource", DATASOURCE) != DATASOURCE:
                problems.append(f"{where} {target.get('refId')}: datasource is not {DATASOURCE}")
    return problems


def check_metric_names(sources: dict[str, str], samples: dict[str, str]) -> list[str]:
    """Every grantwire_* name in ``sources`` (where -> text) is a sample the code exports
    (or, in prose such as an alert's description, a metric family)."""
    known = set(samples) | set(samples.values())
    problems = []
    for where, text in sources.items():
        for name in sorted(set(METRIC.findall(text))):
            if name not in known:
                problems.append(f"{where}: {name} is not exported by the code")
    return problems


def check_alert_tests(rules: str, tests: str) -> list[str]:
    alerts = re.findall(r"^\s*-\s*alert:\s*(\S+)", rules, flags=re.MULTILINE)
    tested = set(re.findall(r"alertname:\s*(\S+)", tests))
    if not alerts:
        return ["prometheus-rules.yaml: no alerts found"]
    return [f"alert {a}: no test in prometheus-rules.test.yaml" for a in alerts if a not in tested]


def check_promql(expressions: list[tuple[str, str]], promtool: str) -> list[str]:
    """Parse each expression with promtool (as recording rules of a scratch rule file)."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for index, (where, expr) in enumerate(expressions):
        # Grafana's label_values(<series selector>, <label>): the selector is PromQL
        expr = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", expr.strip())
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        lines += [f"      - record: dashboard:expr_{index}", f"        expr: {json.dumps(expr)}"]
        lines.append(f"        labels: {{where: {json.dumps(where)}}}")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as scratch:
        scratch.write("\n".join(lines) + "\n")
    try:
        result = subprocess.run(
            [promtool, "check", "rules", scratch.name], capture_output=True, text=True, check=False
        )
    finally:
        Path(scratch.name).unlink()
    if result.returncode != 0:
        return [f"dashboard PromQL (promtool):\n{result.stdout}{result.stderr}"]
    return []


def check_all(promtool: str | None = None) -> list[str]:
    """Every finding of the checks above (empty: all good)."""
    try:
        dashboard = json.loads(DASHBOARD.read_text())
    except ValueError as exc:
        return [f"{DASHBOARD.name}: not JSON: {exc}"]
    rules, tests = RULES.read_text(), RULE_TESTS.read_text()
    samples = exported_samples()
    expressions = dashboard_expressions(dashboard)
    sources = {f"{DASHBOARD.name} {where}": expr for where, expr in expressions}
    sources[RULES.name] = rules
    problems = check_dashboard(dashboard)
    problems += check_metric_names(sources, samples)
    problems += check_alert_tests(rules, tests)
    if promtool:
        problems += check_promql(expressions, promtool)
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--promtool", help="promtool binary: also parse the dashboard's PromQL")
    args = parser.parse_args()
    problems = check_all(args.promtool)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    count = len(dashboard_expressions(json.loads(DASHBOARD.read_text())))
    print(f"  {len(problems)} finding(s); {count} dashboard expressions, metric names checked")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
