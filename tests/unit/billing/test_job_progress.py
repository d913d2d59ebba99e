"""Job reports and the progress bar: a bar on a terminal only, never in CronJob logs."""

from __future__ import annotations

import io

import pytest

from services.billing import jobs


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    with jobs.terminal_progress("billing reconcile") as progress:
        assert progress is None


def test_a_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    with jobs.terminal_progress("billing reconcile") as progress:
        assert progress is not None
        progress(250, 500)
        progress(500, 500)


def test_reports_exit_1_only_on_problems() -> None:
    assert jobs.ReconcileReport(accepted=3).exit_code == 0
    assert jobs.ReconcileReport(status="lock_held").exit_code == 0
    assert jobs.ReconcileReport(errors=1).exit_code == 1
    assert jobs.ExpireReport(errors=2).exit_code == 1
    audit = jobs.AuditReport()
    assert audit.exit_code == 0
    audit.add("duplicate_key", [{"ref_id": f"k{i}", "count": 2} for i in range(150)])
    assert audit.exit_code == 1
    assert audit.finding_counts == {"duplicate_key": 150} and len(audit.findings) == 100
    assert "lock_holder" not in jobs.ReconcileReport().as_dict()
