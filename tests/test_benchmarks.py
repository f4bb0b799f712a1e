"""The benchmark harness (``python -m benchmarks``): a smoke run end to end, and the few pure
pieces its numbers rest on. No timing is asserted: only that the harness measures and reports.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

# `benchmarks` lives at the repository root, beside `src`: importable under bare `pytest` too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import tasks, workloads
from benchmarks.runner import ROOT, rotate


def test_quick_run_writes_a_table_with_a_time_per_contender(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "b",
            "--contenders",
            "loop,multitrack",
            "--write",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    print(done.stderr)
    assert done.returncode == 0, done.stderr
    report = out.read_text()
    assert "## Summary" in report and "## (b) trivial" in report
    assert "| (b) trivial |" in report  # the summary row
    for label in ("loop", r"\*\*multitrack\*\*"):
        row = re.search(rf"^\| {label} \| ([0-9.e-]+) \|", report, re.MULTILINE)
        assert row is not None, f"no timed row for {label}:\n{report}"
        assert float(row.group(1)) > 0
    assert "None: every run finished" in report


def test_spin_results_have_a_closed_form() -> None:
    inputs = [0, 1, 6, 7, 13, 1000]
    assert workloads.check("c", inputs, [tasks.spin(n) for n in inputs]) is None
    assert workloads.check("c", inputs, [0] * len(inputs)) is not None


def test_ideal_is_the_makespan_lower_bound() -> None:
    # four equal tasks on two cores: half the work; one task of most of the work: that task
    assert workloads.ideal_fraction({"iterations": [1, 1, 1, 1]}, cores=2) == 0.5
    assert workloads.ideal_fraction({"iterations": [8, 1, 1]}, cores=2) == 0.8
    assert workloads.ideal_fraction({"count": 3}, cores=2) is None


def test_round_robin_rotates_the_first_contender() -> None:
    names = ("a", "b", "c")
    assert [rotate(names, r)[0] for r in range(4)] == ["a", "b", "c", "a"]
