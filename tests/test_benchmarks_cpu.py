"""``python -m benchmarks.cpu``, ``.simulate`` and ``.threadcost``: the machinery that says
where the CPU goes, and how far one parent carries. No timing is asserted, only that each
figure comes from where it should."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import one, threadcost, threads
from benchmarks.cpu_figures import figures
from benchmarks.pairing import Paired
from benchmarks.runner import ROOT, Outcome
from benchmarks.simulate import simulate


def test_a_thread_is_read_from_proc_with_its_cpu_wakeups_and_what_it_waits_in() -> None:
    stop = threading.Event()
    tid: list[int] = []

    def sleeper() -> None:
        tid.append(threading.get_native_id())
        while not stop.is_set():
            time.sleep(0.002)

    thread = threading.Thread(target=sleeper)
    thread.start()
    try:
        time.sleep(0.05)
        seen = threads.ThreadSeen(os.getpid(), tid[0], 0.0, 0.0)
        for _ in range(5):
            assert threads.read_thread(seen, time.monotonic())
        assert seen.cpu_ns > 0 and seen.vcs > 5  # it slept and woke a dozen times at least
        # time.sleep waits in clock_nanosleep (3.11+) or pselect6 (3.10)
        assert seen.role() in ("clock_nanosleep", "pselect6", "running")
    finally:
        stop.set()
        thread.join()
    assert not threads.read_thread(seen, time.monotonic())  # gone


def test_the_sampler_finds_the_threads_of_a_child_process() -> None:
    code = (
        "import threading, time\n"
        "def spin():\n"
        "    end = time.monotonic() + 0.3\n"
        "    while time.monotonic() < end: pass\n"
        "t = threading.Thread(target=spin); t.start(); t.join()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    sampler = threads.ThreadSampler(child.pid)
    child.wait(timeout=20)
    seen = sampler.stop()
    assert {t["pid"] for t in seen} == {child.pid}
    helpers = [t for t in seen if t["tid"] != child.pid]
    assert len(helpers) == 1 and helpers[0]["cpu_s"] > 0.05  # most of its 0.3 s spin


def test_a_cpu_run_brackets_the_call_and_traces_every_task(tmp_path: Path) -> None:
    spec = {"contender": "loop", "workers": 2, "mode": "cpu", "out_dir": str(tmp_path)}
    got = one.measure({**spec, "workload": "c", "params": {"iterations": [100_000] * 4}})
    assert got["ok"], got
    detail = got["detail"]
    assert detail["tasks"] == 4 and detail["pid"] == os.getpid()
    assert detail["task_threads"] == [(os.getpid(), threading.get_native_id())]
    assert 0 <= detail["tail_s"] < got["seconds"] and detail["first_start_s"] >= 0
    # the loop's tasks ran in this process: its CPU holds them
    assert detail["usage"]["self"]["cpu_s"] >= got["task_cpu_s"] * 0.9


def _run(name: str, round_: int, task_cpu: float, parent_cpu: float, children: float) -> Outcome:
    """A run of 2 s with two workers (pids 11, 12) that each have a helper thread."""
    usage = {
        "self": {"cpu_s": parent_cpu, "vcs": 200, "nvcs": 10},
        "main": {"cpu_s": parent_cpu * 0.75, "vcs": 150, "nvcs": 8},
        "children": {"cpu_s": children, "vcs": 0, "nvcs": 0},
    }
    sampled = [
        {"pid": pid, "tid": tid, "cpu_s": cpu, "vcs": vcs, "alive_s": 2.0, "role": role}
        for pid in (11, 12)
        for tid, cpu, vcs, role in ((pid, 1.0, 20, "futex"), (pid + 100, 0.004, 80, "recvmsg"))
    ]
    detail = {
        "pid": 10,
        "usage": usage,
        "threads": sampled,
        "task_threads": [[11, 11], [12, 12]],
        "first_start_s": 0.005,
        "tail_s": 0.003,
    }
    return Outcome(name, "c", "ok", seconds=2.0, task_cpu_s=task_cpu, round=round_, detail=detail)


def test_figures_tell_the_parent_the_workers_and_their_helper_threads_apart() -> None:
    loop = [
        Outcome("loop", "c", "ok", seconds=4.0, task_cpu_s=cpu, round=r)
        for r, cpu in enumerate([3.8, 4.0])
    ]
    mt = [_run("multitrack", r, 4.0, 0.02, 4.1) for r in range(2)]
    got = figures([*loop, *mt], "multitrack")
    assert got.runs == 2 and got.seconds == 2.0
    assert got.task_cpu_vs_loop == Paired(pytest.approx(1.026, abs=1e-3), 1.0, 4.0 / 3.8, 2)
    assert got.tree_cpu_vs_loop is not None and got.tree_cpu_vs_loop.high == pytest.approx(
        4.12 / 3.8
    )
    assert got.parent_cpu_s == 0.02 and got.parent_helpers_cpu_s == pytest.approx(0.005)
    assert got.beyond_tasks_s == pytest.approx(0.1)  # the reaped workers' CPU over the tasks'
    assert got.helpers_cpu_s == pytest.approx(0.004)  # per worker: its thread that ran no task
    assert got.helper_roles == "recvmsg 8.0"  # both workers' helpers, ms per run
    assert got.parent_wakeups == 100 and got.parent_preempted == 5
    assert got.worker_wakeups == 50 and got.worker_task_thread_wakeups == 10
    assert got.tail_s == 0.003


def test_a_quick_cpu_run_writes_its_tables_and_renders_them_again(tmp_path: Path) -> None:
    saved, out = tmp_path / "cpu.json", tmp_path / "cpu.md"
    command = [sys.executable, "-m", "benchmarks.cpu", "--quick", "--rounds", "1"]
    command += ["--only", "c,two", "--contenders", "loop,multitrack", "--settle", "0"]
    done = subprocess.run(
        [*command, "--json", str(saved), "--write", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = out.read_text()
    assert "### (c) 20 ms tasks" in text and "### one call of 2 no-op tasks" in text
    assert text.count("| **multitrack** |") == 2 and "Failed runs" not in text
    rendered = subprocess.run(
        [sys.executable, "-m", "benchmarks.cpu", "--render", str(saved)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    assert rendered.stdout == text
    runs = json.loads(saved.read_text())["groups"]["c"]
    assert {run["contender"] for run in runs} == {"loop", "multitrack"}
    assert all(run["detail"]["threads"] for run in runs)  # sampled from outside


def test_the_simulated_pool_runs_the_real_scheduler_to_the_end() -> None:
    result = simulate(8, 0.010, 2_000, fds=True)
    assert result.tasks == 2_000 and 0 < result.chunks < 2_000  # auto: several tasks a chunk
    # 8 workers, 20 s of work: at least 2.5 simulated seconds, and not much more
    assert 2.5 <= result.simulated_s < 2.5 * 1.2
    assert result.parent_cpu_s > 0 and result.parent_share == pytest.approx(
        result.parent_cpu_s / result.simulated_s
    )
    one_by_one = simulate(4, 0.010, 100, chunksize=1, fds=False)
    assert one_by_one.chunks == 100 and one_by_one.simulated_s == pytest.approx(0.25)


def test_the_thread_cost_probe_runs_its_helper_and_stops_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = threading.active_count()
    woken: list[int] = []
    real_wake = threadcost._wake

    def counting(stop: threading.Event, wakeups: int) -> None:
        woken.append(wakeups)
        real_wake(stop, wakeups)

    monkeypatch.setattr(threadcost, "_wake", counting)
    assert threadcost.main(["--iterations", "20000", "--tasks", "3", "--rounds", "2"]) == 0
    assert sorted(woken) == sorted(2 * threadcost.RATES)  # a helper per rate, none alone
    assert threading.active_count() == before
    assert "  20/s: " in capsys.readouterr().out
