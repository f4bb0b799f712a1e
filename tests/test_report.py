"""The end-of-run report: counts, where the time went, failures grouped by kind and place with
the first traceback in full, the slowest tasks; printed when worth it, given to ``report=``."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest

import faults
import multitrack as mt
from multitrack._report import Report


def _run_with_failures(**options: Any) -> tuple[list[Any], Report]:
    reports: list[Report] = []
    results = mt.map(
        faults.three_kinds_of_failure,
        range(1000),
        errors="return",
        retries=1,
        report=reports.append,
        **options,
    )
    (report,) = reports
    return results, report


@pytest.mark.timeout(60)
def test_a_run_with_three_kinds_of_failure_is_summed_up() -> None:
    results, report = _run_with_failures(workers=2)
    failed = [r for r in results if isinstance(r, mt.TaskError)]
    assert (report.succeeded, report.failed) == (1000 - len(failed), len(failed)) == (988, 12)
    assert report.failed_by_kind == {"ValueError": 10, "KeyError": 1, "WorkerCrashed": 1}
    assert report.retried == 12 and report.reused == 0 and report.outcome == "done"
    groups = {g.kind: g for g in report.groups.values()}
    assert groups["ValueError"].count == 10 and groups["ValueError"].where.startswith("faults.py:")
    assert sorted(groups["ValueError"].indices) == list(range(97, 1000, 97))
    assert (
        groups["KeyError"].first_index == 500 and "raise KeyError" in groups["KeyError"].traceback
    )
    assert groups["WorkerCrashed"].where == "killed by SIGKILL"
    text = str(report)
    assert "988 ok · 12 failed (10 ValueError, 1 KeyError, 1 WorkerCrashed) · 12 retried" in text
    assert "first failure's traceback" in text and "three_kinds_of_failure" in text
    assert len(text.splitlines()) < 40
    assert report.busy_seconds > 0 and report.seconds > 0


def test_the_report_is_printed_when_worth_it_and_given_where_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MULTITRACK_PROGRESS")  # the suite turns bars off
    fail = functools.partial(faults.fail_on, bad=1)
    mt.map(fail, range(3), errors="return", progress="log")
    assert "2 ok · 1 failed (1 ValueError)" in capsys.readouterr().err  # failures: printed
    mt.map(faults.square, range(3), progress="log")
    assert "multitrack: square x 3" in capsys.readouterr().err  # log mode: printed
    mt.map(fail, range(3), errors="return", progress="log", report=False)
    assert "failed (1 ValueError)" not in capsys.readouterr().err  # report=False: silent
    mt.map(faults.square, range(3), report=True, progress=False)  # bar off, report forced on
    assert "3 ok · 0 failed" in capsys.readouterr().err
    mt.map(faults.square, range(3), progress=False)
    assert capsys.readouterr().err == ""  # a short clean run with the bar off: nothing
    path = tmp_path / "report.json"
    mt.map(fail, range(3), errors="return", report=path)
    data = json.loads(path.read_text())
    assert data["succeeded"] == 2 and data["failures"][0]["type"] == "ValueError"
    assert data["failures"][0]["indices"] == [1] and "fail_on" in data["failures"][0]["where"]


def test_imap_keeps_its_report_and_a_resumed_run_counts_what_it_reused(tmp_path: Path) -> None:
    results = mt.imap(faults.square, range(5), checkpoint=tmp_path / "run.sqlite")
    assert list(results) == [0, 1, 4, 9, 16]
    assert results.report.succeeded == 5  # type: ignore[attr-defined]
    again = mt.imap(faults.square, range(7), checkpoint=tmp_path / "run.sqlite")
    assert list(again) == [0, 1, 4, 9, 16, 25, 36]
    assert (again.report.reused, again.report.succeeded) == (5, 2)  # type: ignore[attr-defined]


def test_an_imap_left_before_its_end_says_closed_not_stopped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Breaking out of the loop is the caller's choice, not a failure of the run.
    monkeypatch.delenv("MULTITRACK_PROGRESS")  # the suite turns bars off
    results = mt.imap(faults.sleep_for, [0.01] * 50, workers=2, chunksize=1, progress="log")
    assert next(results) == 0.01
    results.close()  # type: ignore[attr-defined]
    assert results.report.outcome == "closed"  # type: ignore[attr-defined]
    err = capsys.readouterr().err
    assert re.search(r"multitrack: closed \d+/50", err) and "(process), closed" in err, err


def test_the_slowest_tasks_are_those_timed_alone() -> None:
    reports: list[Report] = []
    sleeps = [0.01, 0.3, 0.01, 0.2, 0.01, 0.01, 0.01]
    mt.map(faults.sleep_for, sleeps, workers=2, chunksize=1, report=reports.append)
    slowest = reports[0].slowest
    assert [index for _, index, _ in slowest[:2]] == [1, 3]
    assert slowest[0][0] >= 0.3 and slowest[0][2] == "0.3"
