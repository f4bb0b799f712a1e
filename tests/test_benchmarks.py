"""The benchmark harness (``python -m benchmarks``): a smoke run end to end, and the few pure
pieces its numbers rest on. No timing is asserted: only that the harness measures and reports.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

# `benchmarks` lives at the repository root, beside `src`: importable under bare `pytest` too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import one, report, tasks, workloads
from benchmarks.contenders import CLUSTER_MAX_RUNS, CONTENDERS, DEFAULT
from benchmarks.machine import Machine
from benchmarks.results import Results, WorkloadResult
from benchmarks.runner import ROOT, Outcome, rotate
from benchmarks.stats import best_peer, make_rows

CLUSTER = ("multitrack-ray", "multitrack-dask")


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


def _sleep_then_spin(iterations: int) -> int:
    time.sleep(0.3)  # wall time, no CPU time: not work
    return tasks.spin(iterations)


def test_a_cpu_timed_task_reports_its_cpu_time_not_its_wall_time() -> None:
    # No absolute bound on a time (a loaded machine stretches everything): the task sleeps
    # 0.3 s and does almost no work, so its CPU time is a small fraction of the wall time of
    # the same call, however slow the machine; wall time measured instead would be all of it.
    timed = pickle.loads(pickle.dumps(tasks.CpuTimed(tasks.spin)))  # crosses to workers as is
    assert timed.fn is tasks.spin
    started = time.perf_counter()
    value, cpu = tasks.CpuTimed(_sleep_then_spin)(1_000)
    wall = time.perf_counter() - started
    assert value == tasks.spin(1_000)
    assert wall >= 0.3
    assert 0 < cpu < wall / 10, f"{cpu:.3f} s of CPU in {wall:.3f} s: wall time, not CPU time"


def test_the_work_floor_is_the_even_spread_or_the_longest_task() -> None:
    assert one.work_floor([1.0, 1.0, 1.0, 1.0], cores=2) == 2.0
    assert one.work_floor([3.0, 0.5, 0.5], cores=2) == 3.0
    assert one.work_floor([1.0, 1.0], cores=1) == 2.0  # the loop: one core


def test_measure_reports_the_work_floor_on_cpu_workloads_only(tmp_path: Path) -> None:
    spec = {"contender": "loop", "workers": 2, "mode": "map", "out_dir": str(tmp_path)}
    spin = one.measure({**spec, "workload": "c", "params": {"iterations": [200_000] * 3}})
    assert spin["ok"], spin  # results unwrapped from their CPU times, then checked
    assert 0 < spin["floor_s"] <= spin["seconds"]  # the loop adds next to nothing to its work
    assert spin["task_cpu_s"] == spin["floor_s"]  # one core: the floor is all the work
    trivial = one.measure({**spec, "workload": "b", "params": {"count": 10}})
    assert trivial["ok"] and "floor_s" not in trivial and "task_cpu_s" not in trivial


def test_each_run_is_measured_against_its_own_work() -> None:
    # the machine ran slow in the second run: a longer time, more CPU time in the tasks, a
    # higher floor; the overhead, the efficiency and the time over the floor stay the same
    runs = [(2.0, 3.8, 1.9), (3.0, 5.8, 2.9), (2.1, 3.8, 1.9), (2.2, None, None)]
    outcomes = [
        Outcome("multitrack", "c", "ok", seconds=s, task_cpu_s=cpu, floor_s=floor)
        for s, cpu, floor in runs
    ]
    outcomes.append(Outcome("multitrack", "c", "timeout"))
    (row,) = make_rows(outcomes, ["multitrack"])
    assert row.overhead_s == pytest.approx(0.1)
    assert row.cores_busy == pytest.approx(1.9)  # 3.8 / 2.0 (5.8 / 3.0 and 3.8 / 2.1 around it)
    assert row.over_floor == pytest.approx(2.0 / 1.9)
    peers = [
        Outcome("pool-map", "c", "ok", seconds=2.1, task_cpu_s=3.8, floor_s=1.9) for _ in range(3)
    ]
    loop = [Outcome("loop", "c", "ok", seconds=8.0) for _ in range(3)]  # a slow spell: ignored
    names = ("loop", "multitrack", "pool-map")
    cpu = WorkloadResult("c", {"iterations": [10] * 20}, names, (*loop, *outcomes, *peers))
    text = report.render(_results(cpu))
    assert "efficiency 95% (best peer 90%); overhead 100 ms (best peer 200)" in text
    # at equal speed: the typical floor (1.9 s) plus each overhead, (1.9 + 0.1) / (1.9 + 0.2)
    assert re.search(r"^\| \(c\) cpu \|.*\| 0\.95 \| efficiency", text, re.MULTILINE)
    assert re.search(r"^\| pool-map \| 2\.10 \|.*\| 90% \|.*\| 1\.11 \| 200 \| 0 B \|$", text, re.M)


def test_round_robin_rotates_the_first_contender() -> None:
    names = ("a", "b", "c")
    assert [rotate(names, r)[0] for r in range(4)] == ["a", "b", "c", "a"]


def test_cluster_backends_are_default_contenders_but_not_peers() -> None:
    for name in CLUSTER:
        contender = CONTENDERS[name]
        assert name in DEFAULT
        assert contender.cluster and not contender.peer and contender.first is not None
        assert f'backend="{name.split("-")[1]}"' in contender.code
        assert any("timed" in note for note in contender.notes)  # start-up is in the time
    assert not CONTENDERS["multitrack"].cluster


def test_cluster_backends_run_on_a_few_workloads_and_runs_spread_over_the_run() -> None:
    ray = CONTENDERS["multitrack-ray"]
    assert ray.runs_in("c", 0, 5) and not ray.runs_in("a", 0, 5)
    taken = [run for run in range(10) if ray.runs_in("cold", run, 10)]
    assert taken == [0, 2, 4, 6, 8] and len(taken) == CLUSTER_MAX_RUNS
    assert all(CONTENDERS["pool-map"].runs_in("a", run, 10) for run in range(10))
    assert not CONTENDERS["pool-map"].runs_in("cold", 0, 10)  # no lazy map, no cold start


def _results(*workloads: WorkloadResult) -> Results:
    machine = Machine("cpu", 2, 2, 1.0, "os", "3.11", "fork", {}, "today", "0")
    return Results(machine, "cmd", 3, 2, "log", True, 60.0, 0.0, 0, "1m", workloads, None)


def _outcomes(name: str, seconds: float, runs: int = 3) -> list[Outcome]:
    return [Outcome(name, "c", "ok", seconds=seconds) for _ in range(runs)]


def test_report_shows_cluster_backends_apart_against_multitrack() -> None:
    # a cluster backend faster than every peer still is neither the best peer nor in the table
    names = ("loop", "multitrack", "pool-map", "multitrack-ray")
    outcomes = (
        *_outcomes("loop", 4.0),
        *_outcomes("multitrack", 2.0),
        *_outcomes("pool-map", 2.5),
        *_outcomes("multitrack-ray", 1.0, runs=2),
    )
    cpu = WorkloadResult("c", {"iterations": [10] * 20}, names, outcomes)
    results = _results(cpu)
    peer = best_peer(cpu.rows)
    assert peer is not None and peer.contender == "pool-map"
    text = report.render(results)
    peers, cluster = text.split("## Cluster backends on one machine")
    assert "multitrack-ray" not in peers.split("## (c) cpu")[1]
    assert "| (c) cpu | multitrack-ray | 1.00 | 1.00\u20131.00 | 4.00 | 0.50 | 2/2 |" in cluster
    assert "**multitrack** (process backend) | 2.00" in cluster
    assert "fewer than the others" in cluster  # 2 runs where the peers had 3: said why
