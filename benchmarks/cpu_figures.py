"""From the runs of ``python -m benchmarks.cpu`` to the figures of its tables.

One ``Figures`` per (workload, contender): each figure is worked out run by run from what the
child measured (``benchmarks.cpu_child``: the kernel's accounting around the call, the traced
tasks) and what the runner sampled (``benchmarks.threads``: every thread of the tree), then
the median over the rounds is taken. Ratios to the loop are paired: a run over the loop's run
of the same round.

Who is who in a run's threads: the **parent** is the measured process (its pid is the tree's
root, the one process no task ran in, unless it is the loop); **workers** are the processes
whose threads ran tasks (``task_threads``), and a worker's **helper threads** are its threads
that ran none (multitrack's reader and ticker, say). Processes of the tree that ran no task
(a forkserver, a resource tracker, a worker that got none) count to the workers' CPU but not to
the per-worker figures.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.pairing import Paired, by_round
from benchmarks.runner import Outcome

__all__ = ["MIN_LOOP_CPU_S", "Figures", "figures"]

#: Below this, the loop's tasks' CPU time is no yardstick (two no-op tasks: microseconds).
MIN_LOOP_CPU_S = 0.010


@dataclass(frozen=True)
class Figures:
    """Medians over a contender's runs of one workload (``None``: not measured)."""

    contender: str
    runs: int
    seconds: float | None
    task_cpu_vs_loop: Paired | None  # the tasks' CPU over the loop's, per round
    tree_cpu_vs_loop: Paired | None  # the whole tree's CPU over the loop's tasks' CPU
    parent_cpu_s: float | None
    parent_helpers_cpu_s: float | None  # the parent's threads other than the caller's
    beyond_tasks_s: float | None  # workers' CPU beyond their tasks' (the loop: the parent's)
    helpers_cpu_s: float | None  # per worker: its helper threads' CPU (sampled)
    helper_roles: str  # what the helper threads wait in, most CPU first
    parent_wakeups: float | None  # per second of the call: voluntary context switches
    parent_preempted: float | None  # per second: involuntary ones
    worker_wakeups: float | None  # per second of a worker's life, all its threads
    worker_task_thread_wakeups: float | None  # ... its task thread alone
    first_start_s: float | None  # from the call to its first task's start
    tail_s: float | None  # from the last task's end to the call's return


def figures(outcomes: Sequence[Outcome], name: str) -> Figures:
    """The figures of contender ``name`` from every run of one workload."""
    runs = [o for o in outcomes if o.contender == name and o.status == "ok" and o.detail]
    per_run = [_run_figures(o) for o in runs]

    def median(key: str) -> float | None:
        values = [value for f in per_run if (value := f.get(key)) is not None]
        return statistics.median(values) if values else None

    return Figures(
        contender=name,
        runs=len(runs),
        seconds=median("seconds"),
        task_cpu_vs_loop=_vs_loop(outcomes, name, _task_cpu),
        tree_cpu_vs_loop=_vs_loop(outcomes, name, _tree_cpu),
        parent_cpu_s=median("parent_cpu_s"),
        parent_helpers_cpu_s=median("parent_helpers_cpu_s"),
        beyond_tasks_s=median("beyond_tasks_s"),
        helpers_cpu_s=median("helpers_cpu_s"),
        helper_roles=_roles(runs),
        parent_wakeups=median("parent_wakeups"),
        parent_preempted=median("parent_preempted"),
        worker_wakeups=median("worker_wakeups"),
        worker_task_thread_wakeups=median("worker_task_thread_wakeups"),
        first_start_s=median("first_start_s"),
        tail_s=median("tail_s"),
    )


def _task_cpu(outcome: Outcome) -> float | None:
    return outcome.task_cpu_s


def _tree_cpu(outcome: Outcome) -> float | None:
    """The CPU of the whole tree during the call: the parent and every worker."""
    if not outcome.detail:
        return None
    return float(outcome.detail["usage"]["self"]["cpu_s"]) + _workers_cpu(outcome)


def _vs_loop(
    outcomes: Sequence[Outcome], name: str, value: Callable[[Outcome], float | None]
) -> Paired | None:
    """``value`` of ``name``'s run over the loop's tasks' CPU, round by round."""
    mine, loop = by_round(outcomes, name, value), by_round(outcomes, "loop", _task_cpu)
    common = sorted(mine.keys() & loop.keys())
    return Paired.of([mine[r] / loop[r] for r in common if loop[r] >= MIN_LOOP_CPU_S])


def _workers_cpu(outcome: Outcome) -> float:
    """The workers' CPU: what the kernel counted for the children reaped during the call, or
    what was sampled of the tree's other processes when that is more (workers kept alive)."""
    detail = outcome.detail or {}
    reaped = float(detail["usage"]["children"]["cpu_s"])
    root = _root(detail)
    sampled = sum(float(t["cpu_s"]) for t in detail.get("threads", []) if t["pid"] != root)
    return max(reaped, sampled)


def _root(detail: dict[str, Any]) -> int | None:
    """The measured process's pid."""
    root: int | None = detail.get("pid")
    return root


def _run_figures(outcome: Outcome) -> dict[str, float | None]:
    detail = outcome.detail or {}
    usage, seconds = detail["usage"], outcome.seconds or 0.0
    task_cpu = outcome.task_cpu_s or 0.0
    parent = usage["self"]
    serial = outcome.contender == "loop"
    beyond = parent["cpu_s"] - task_cpu if serial else _workers_cpu(outcome) - task_cpu
    found: dict[str, float | None] = {
        "seconds": seconds,
        "parent_cpu_s": parent["cpu_s"],
        "parent_helpers_cpu_s": max(0.0, parent["cpu_s"] - usage["main"]["cpu_s"]),
        "beyond_tasks_s": beyond,
        "parent_wakeups": parent["vcs"] / seconds if seconds else None,
        "parent_preempted": parent["nvcs"] / seconds if seconds else None,
        "first_start_s": detail["first_start_s"],
        "tail_s": detail["tail_s"],
    }
    found.update(_worker_figures(detail, serial))
    return found


def _worker_figures(detail: dict[str, Any], serial: bool) -> dict[str, float | None]:
    """Per worker, the median over the workers: helper threads' CPU, wake-ups per second."""
    if serial or not detail.get("threads"):
        return {}
    task_threads = {tuple(pair) for pair in detail["task_threads"]}
    workers = {pid for pid, _ in task_threads}
    helpers, wakeups, task_wakeups = [], [], []
    for pid in workers:
        mine = [t for t in detail["threads"] if t["pid"] == pid]
        if not mine:
            continue
        alive = max(t["alive_s"] for t in mine) or None
        helpers.append(sum(t["cpu_s"] for t in mine if (pid, t["tid"]) not in task_threads))
        if alive:
            wakeups.append(sum(t["vcs"] for t in mine) / alive)
            task_wakeups.append(
                sum(t["vcs"] for t in mine if (pid, t["tid"]) in task_threads) / alive
            )
    return {
        "helpers_cpu_s": statistics.median(helpers) if helpers else None,
        "worker_wakeups": statistics.median(wakeups) if wakeups else None,
        "worker_task_thread_wakeups": statistics.median(task_wakeups) if task_wakeups else None,
    }


def _roles(runs: Sequence[Outcome]) -> str:
    """The workers' helper threads by what they wait in, with their CPU per run (ms)."""
    cpu: Counter[str] = Counter()
    for outcome in runs:
        detail = outcome.detail or {}
        task_threads = {tuple(pair) for pair in detail.get("task_threads", [])}
        workers = {pid for pid, _ in task_threads} - {detail.get("pid")}  # the loop: none
        for thread in detail.get("threads", []):
            key = (thread["pid"], thread["tid"])
            if thread["pid"] in workers and key not in task_threads:
                cpu[thread["role"]] += thread["cpu_s"]
    if not runs or not cpu:
        return ""
    return ", ".join(f"{role} {total / len(runs) * 1000:.1f}" for role, total in cpu.most_common())
