"""The bench's results table: each row names the run of the part it came from."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench import ceiling, report

LATEST = Path(__file__).parents[3] / "bench" / "results" / "latest.json"


def _latest() -> dict[str, Any]:
    latest: dict[str, Any] = json.loads(LATEST.read_text())
    latest.pop("figures", None)  # recomputed from the parts
    return latest


def test_every_row_names_the_run_of_its_own_part() -> None:
    latest = _latest()
    parts = latest["parts"]
    if "pipeline" not in parts or "ceiling" not in parts["pipeline"]:
        pytest.skip("the committed results have no pipeline ceiling")
    for name, part in parts.items():
        part["run_id"] = f"id-{name}"
    rows = report.figures(latest)
    runs = {row["figure"]: row.get("run", "") for row in rows}
    for figure, run in runs.items():
        if figure.startswith("1."):
            assert run == " (run id-baseline)"
        elif figure.startswith("2."):
            assert run == " (run id-pipeline)", figure
        elif figure.startswith("4."):
            assert run == " (run id-reconcile)"
        elif figure.startswith("5."):
            assert run == " (run id-dlq)"
        elif figure.startswith("3.") and "extra run" not in figure:
            assert run == " (run id-latency)"
    assert any(figure.startswith("2. ceiling") for figure in runs)


def test_without_a_ceiling_the_rows_still_line_up() -> None:
    latest = _latest()
    parts = latest["parts"]
    if "pipeline" not in parts or "reconcile" not in parts:
        pytest.skip("the committed results lack the parts this needs")
    parts["pipeline"] = copy.deepcopy(parts["pipeline"])
    parts["pipeline"].pop("ceiling", None)
    for name, part in parts.items():
        part["run_id"] = f"id-{name}"
    rows = {row["figure"]: row.get("run", "") for row in report.figures(latest)}
    reconcile = next(run for figure, run in rows.items() if figure.startswith("4."))
    assert reconcile == " (run id-reconcile)"
    assert not any(figure.startswith("2. ceiling") for figure in rows)


def test_the_echo_credits_the_referee_the_tap_waits_for() -> None:
    provisioned = json.dumps(
        {"user_id": "referee-c1-000042", "organization_id": "org-c1-000042"}
    ).encode()
    credit = json.loads(ceiling.credit_body(provisioned))
    assert credit["invitation_id"] == "inv-c1-000042"
    assert (credit["source"], credit["side"]) == ("referral", "referee")
    assert credit["organization_id"] == "org-c1-000042"
