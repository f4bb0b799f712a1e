"""memory_limit=: sizes, the readers of /proc and the cgroup, the OOM verdict, the run budget's
policy (against a fake backend and a fake clock, in milliseconds), and real workers that leak,
outgrow their limit, or are killed by the kernel in a real memory cgroup."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import multitrack as mt
from multitrack import _budget, _memory
from multitrack._budget import Budget
from multitrack._chunks import ChunkSizer
from multitrack._run import Policy, Run
from multitrack.backends._base import (
    Backend,
    Chunk,
    Completed,
    Event,
    Lost,
    MemoryUse,
    Output,
    Running,
)
from test_run_unit import FakeClock, RecordingProgress, assert_every_task_is_in_one_place

MB = 1_000_000
HERE = Path(__file__).parent


# -- sizes and options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "size"),
    [(5, 5), ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5g", 15 * 10**8), ("10 kB", 10**4)],
)
def test_sizes_are_read_as_people_write_them(given: Any, size: int) -> None:
    assert _memory.parse_size("memory_limit", given) == size


@pytest.mark.parametrize("given", ["lots", "5iB", "-1GB", 0, 1.5, True])
def test_a_wrong_size_is_refused_naming_the_argument(given: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="memory_limit"):
        mt.map(abs, [1], memory_limit=given, progress=False)


@pytest.mark.parametrize("backend", ["thread", "serial"])
def test_memory_limit_is_refused_where_it_cannot_be_honoured(backend: str) -> None:
    refused = f"memory_limit= is not supported with backend='{backend}'"
    with pytest.raises(ValueError, match=refused):
        mt.map(abs, [1], memory_limit="1GB", backend=backend, progress=False)


def test_memory_limit_belongs_to_the_pool() -> None:
    with mt.Pool(workers=1, memory_limit="1GB", progress=False) as pool:
        assert pool.map(abs, [-1]) == [1]
        with pytest.raises(TypeError, match="belongs to the Pool"):
            pool.map(abs, [-1], memory_limit="2GB")  # type: ignore[call-arg]


# -- reading the machine ---------------------------------------------------------------------


def test_pss_falls_back_to_rss_where_smaps_rollup_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = _memory._read
    asked: list[str] = []

    def without_rollup(path: str, size: int) -> bytes | None:
        asked.append(path)
        return None if path.endswith("smaps_rollup") else real(path, size)

    monkeypatch.setattr(_memory, "_read", without_rollup)
    rss = _memory.pss(os.getpid())
    assert rss is not None and rss > MB
    assert asked[-1].endswith("/status")


def test_pss_of_a_process_that_is_gone_is_none() -> None:
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert done.returncode == 0
    assert _memory.pss(2**22 + 7) is None


def test_the_auto_budget_is_the_smallest_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_memory, "_machine_memory", lambda: 16 * 10**9)
    monkeypatch.setattr(_memory, "cgroup_limit", lambda: 4 * 10**9)
    monkeypatch.setattr(_memory, "_rss_rlimit", lambda: None)
    assert _memory.auto_budget() == _memory.Budget(4 * 10**9, "the cgroup's limit")
    monkeypatch.setattr(_memory, "_rss_rlimit", lambda: 10**9)
    assert _memory.auto_budget().source == "RLIMIT_RSS"


def test_the_oom_verdict_comes_from_the_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = iter([_memory.OomCounts(3, None), _memory.OomCounts(4, None)])
    monkeypatch.setattr(_memory.OomCounts, "now", classmethod(lambda cls: next(counts)))
    monkeypatch.setattr(_memory, "_kernel_record", lambda pid, since: None)
    witness = _memory.OomWitness()
    assert witness.explain(123) == (True, "the cgroup's oom_kill count rose from 3 to 4")
    # the next death has a rise of its own to find, or none
    counts = iter([_memory.OomCounts(4, None)])
    assert witness.explain(124) == (
        False,
        "no out-of-memory kill was recorded (oom_kill counters unchanged)",
    )


def test_the_kernel_log_names_the_killed_pid(tmp_path: Path) -> None:
    log = tmp_path / "kmsg"
    log.write_bytes(
        b"3,10,1000,-;Memory cgroup out of memory: Killed process 4242 (python3) "
        b"total-vm:323768kB, anon-rss:102016kB\n"
    )
    found = _memory._kernel_record(4242, 0, path=str(log))
    assert found is not None
    assert found.startswith("Memory cgroup out of memory: Killed process 4242 (python3)")
    assert _memory._kernel_record(424, 0, path=str(log)) is None  # not a prefix match
    assert _memory._kernel_record(4242, 2000, path=str(log)) is None  # an earlier process


def test_the_crash_message_says_oom_from_evidence() -> None:
    crashed = mt.WorkerCrashed.for_death(
        index=7, task="x", attempts=1, returncode=-9, pid=5, oom=(True, "the kernel log says: …")
    )
    assert crashed.oom is True
    assert "the kernel's out-of-memory killer killed it (the kernel log says" in str(crashed)
    assert "often" not in str(crashed)  # not a guess any more
    other = mt.WorkerCrashed.for_death(
        index=7, task="x", attempts=1, returncode=-9, pid=5, oom=(False, "counters unchanged")
    )
    assert other.oom is False and "not the out-of-memory killer" in str(other)


# -- the run budget's policy, against a fake backend ------------------------------------------


class MemoryBackend(Backend):
    """Workers that run one task at a time, each ``("use", megabytes, polls[, ramp])``: it
    holds its megabytes (reached over ``ramp`` polls) for ``polls`` polls, then returns
    them. ``memory()`` is a sample per poll."""

    can_kill = True

    def __init__(self, clock: FakeClock, slots: int = 4, caller: int = 50 * MB) -> None:
        self.clock, self.slots, self.caller = clock, slots, caller
        self.queues: dict[int, list[Chunk]] = {w: [] for w in range(slots)}
        self.now_running: dict[int, _Task] = {}
        self.events: list[Event] = []
        self.peak = 0
        self.together: list[set[int]] = []  # the tasks running at each poll
        self.held: list[int] = []  # the chunks the workers hold at each poll
        self.killed_tasks: list[int] = []
        self.run: Run | None = None
        self.sample: MemoryUse | None = None

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        pass

    def capacity(self) -> int:
        return sum(2 - len(queue) for queue in self.queues.values())

    def submit(self, chunk: Chunk) -> None:
        worker = min(self.queues, key=lambda w: len(self.queues[w]))
        self.queues[worker].append(chunk)

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if self.run is not None:
            assert_every_task_is_in_one_place(self.run)
        self.clock.now += 0.1
        self.held.append(sum(map(len, self.queues.values())))
        events, self.events = self.events, []
        for worker, queue in self.queues.items():
            task = self.now_running.get(worker)
            if task is None and queue:
                task = self.now_running[worker] = _Task(queue[0], 0, self.clock.now + worker / 1e3)
            if task is None:
                continue
            task.age += 1
            if task.age >= task.args[2]:
                events.extend(self._finish(worker, task))
        self.together.append({t.chunk.indices[t.position] for t in self.now_running.values()})
        workers = {w: task.size() for w, task in self.now_running.items()}
        self.sample = MemoryUse(self.clock.now, self.caller, workers)
        self.peak = max(self.peak, self.sample.total)
        return events

    def _finish(self, worker: int, task: _Task) -> list[Event]:
        chunk, position = task.chunk, task.position
        done = Completed(chunk.id, position, [chunk.indices[position]], {}, 0.1, worker)
        if position + 1 < len(chunk.indices):
            self.now_running[worker] = _Task(chunk, position + 1, self.clock.now)
        else:
            self.queues[worker].pop(0)
            del self.now_running[worker]
        return [done]

    def memory(self) -> MemoryUse | None:
        return self.sample

    def running(self) -> list[Running]:
        return [Running(w, t.chunk.id, t.position, t.since) for w, t in self.now_running.items()]

    def kill(self, worker: int) -> None:
        task = self.now_running.pop(worker)
        self.killed_tasks.append(task.chunk.indices[task.position])
        queue = self.queues[worker]
        lost = Lost(worker, [c.id for c in queue], (task.chunk.id, task.position), -9, 1, True)
        self.events.append(lost)
        queue.clear()

    def end(self, *, abort: bool) -> None:
        pass

    def close(self, *, kill: bool = False) -> None:
        pass


class _Task:
    """A task running on a ``MemoryBackend`` worker."""

    def __init__(self, chunk: Chunk, position: int, since: float) -> None:
        self.chunk, self.position, self.since, self.age = chunk, position, since, 0
        self.args = chunk.args[position]

    def size(self) -> int:
        ramp = self.args[3] if len(self.args) > 3 else 0
        share = min(1.0, self.age / ramp) if ramp else 1.0
        return int(self.args[1] * MB * share)


class MemoryProgress(RecordingProgress):
    def set_memory(self, text: str | None) -> None:
        self.memory = text


def budget_run(
    tasks: list[tuple[str, float, int]], *, budget_mb: int, slots: int = 4, **policy: Any
) -> tuple[Run, MemoryBackend, Budget]:
    clock = FakeClock()
    backend = MemoryBackend(clock, slots=slots)
    budget = Budget(_memory.Budget(budget_mb * MB, "a test"), slots=slots, clock=clock)
    run = Run(
        backend,
        lambda arg: arg,
        iter(tasks),
        total=len(tasks),
        ordered=True,
        sizer=ChunkSizer(fixed=1, slots=slots),
        policy=Policy(**policy),
        progress=MemoryProgress(),  # type: ignore[arg-type]
        describe=lambda arg: arg,
        max_ahead=None,
        owns_backend=True,
        clock=clock,
        memory=budget,
    )
    backend.run = run
    return run, backend, budget


def test_near_the_budget_no_new_task_starts() -> None:
    # A task that grows to 800 MB of a 1000 MB budget, and small ones beside it: once it is
    # big, the run is past 85 % and nothing else starts until it ends.
    tasks = [("use", 800, 30, 10)] + [("use", 50, 2)] * 40
    run, backend, budget = budget_run(tasks, budget_mb=1000, slots=2)
    assert list(run) == list(range(41))
    assert budget.stops == 0  # pausing was enough
    big = [i for i, together in enumerate(backend.together) if 0 in together]
    assert len(big) >= 25
    assert all(backend.together[i] == {0} for i in big[-15:])  # it ran alone, once big
    assert any(len(backend.together[i]) == 2 for i in big[:5])  # not while it was small
    assert backend.peak < _budget.SHED_AT * 1000 * MB


def test_over_the_budget_the_newest_task_is_stopped_requeued_and_parallelism_lowered() -> None:
    # Each task grows to 400 MB: three at once pass 95 % of 1000 MB before anyone can pause.
    tasks = [("use", 400, 3)] * 10
    run, backend, budget = budget_run(tasks, budget_mb=1000, slots=3)
    assert list(run) == list(range(10))  # nothing lost, nothing failed
    assert budget.stops >= 1 and backend.killed_tasks
    # the newest one was stopped (the worker that started last: the highest number)
    assert backend.killed_tasks[0] == 2
    # after the stop, no more than two ran at once until a quiet while had passed
    first_stop = next(i for i, tasks in enumerate(backend.together) if len(tasks) == 3)
    assert max(len(t) for t in backend.together[first_stop + 1 :]) <= 2
    assert run.progress.retried == len(backend.killed_tasks)  # type: ignore[attr-defined]


def test_parallelism_comes_back_after_a_quiet_while() -> None:
    # a burst of big tasks, then many small ones: the small ones get every worker again
    tasks = [("use", 400, 3)] * 3 + [("use", 10, 2)] * 400
    run, backend, budget = budget_run(tasks, budget_mb=1000, slots=3)
    assert list(run) == list(range(403))
    assert budget.stops == 1
    assert max(backend.held[1:50]) == 2  # one fewer than were running when it stopped
    assert budget.allowed == 3 and max(backend.held[-50:]) == 3


def test_a_task_stopped_twice_runs_alone_then_fails_with_memory_limit_exceeded() -> None:
    # task 1 alone needs more than the budget: stopped, stopped, alone, stopped: it fails
    tasks = [("use", 100, 4), ("use", 1200, 4)] + [("use", 100, 4)] * 6
    run, backend, budget = budget_run(tasks, budget_mb=1000, slots=2, errors="return")
    results = list(run)
    error = results[1]
    assert isinstance(error, mt.MemoryLimitExceeded)
    assert error.limit == 1000 * MB and error.reached >= 950 * MB
    assert "stopped 3 times, the last one running alone" in str(error)
    assert "1 GB budget (memory_limit='auto': a test)" in str(error)
    assert [r for i, r in enumerate(results) if i != 1] == [0, 2, 3, 4, 5, 6, 7]
    assert backend.killed_tasks.count(1) == 3
    # its third run was alone
    assert budget.alone == set()
    last_run = max(i for i, tasks in enumerate(backend.together) if 1 in tasks)
    assert backend.together[last_run] == {1} and backend.held[last_run] == 1


def test_a_task_stopped_twice_holds_back_everything_else() -> None:
    budget = Budget(_memory.Budget(1000 * MB, "a test"), slots=4, clock=FakeClock())
    assert budget.may_start(2)
    assert budget.stopped(5) and not budget.alone
    assert budget.stopped(5) and budget.alone == {5}
    assert budget.may_start(0) and not budget.may_start(1)  # nothing beside it
    assert not budget.stopped(5)  # a third time: it fails
    assert budget.may_start(1)


def test_memory_limit_exceeded_is_retried_like_any_failure() -> None:
    tasks = [("use", 1200, 4)]
    run, _, _ = budget_run(tasks, budget_mb=1000, slots=2, errors="return", retries=1)
    (error,) = list(run)
    assert isinstance(error, mt.MemoryLimitExceeded) and error.attempts == 2


# -- real workers ------------------------------------------------------------------------------


def leak(x: int, _kept: list[bytes] = []) -> int:  # noqa: B006 - the leak is the point
    _kept.append(b"x" * (50 * MB))  # 50 MB more on every call, never freed
    time.sleep(0.3)  # a few samples per task
    return x


@pytest.mark.timeout(60)
def test_leaking_workers_are_replaced_and_the_run_finishes() -> None:
    results = mt.imap(leak, range(8), workers=2, memory_limit="120MB", progress=False)
    assert list(results) == list(range(8))
    memory = results.report.memory
    assert memory is not None
    assert memory["workers_retired"] >= 2  # each worker holds 2-3 leaks of 50 MB at most
    assert memory["workers_stopped"] == 0
    assert 100 * MB < memory["largest_worker"] < 250 * MB
    assert memory["total"] >= memory["largest_worker"]


def grow(x: int, megabytes: int) -> int:
    kept = []
    for _ in range(megabytes // 10):
        kept.append(b"x" * (10 * MB))
        time.sleep(0.02)
    return x


@pytest.mark.timeout(60)
def test_a_task_far_past_the_limit_is_stopped_and_fails_with_memory_limit_exceeded() -> None:
    sizes = [10, 10, 600, 10]
    results = mt.map(
        grow, range(4), sizes, workers=2, memory_limit="100MB", errors="return", retries=1
    )
    error = results[2]
    assert isinstance(error, mt.MemoryLimitExceeded), error
    assert error.attempts == 2 and error.limit == 100 * MB
    assert 150 * MB < error.reached < 400 * MB  # stopped well before its 600 MB
    assert "past 1.5 x memory_limit=100 MB, and was stopped" in str(error)
    assert [results[i] for i in (0, 1, 3)] == [0, 1, 3]


def test_workers_volunteer_for_the_oom_killer() -> None:
    def adj(_: int) -> str:
        with open("/proc/self/oom_score_adj") as file:
            return file.read().strip()

    assert mt.map(adj, range(2), workers=2, progress=False) == ["1000", "1000"]
    with open("/proc/self/oom_score_adj") as file:
        assert file.read().strip() != "1000"  # the caller is left as it was


def test_without_memory_limit_nothing_is_sampled() -> None:
    from multitrack.backends._process import ProcessBackend

    backend = ProcessBackend(1)
    try:
        assert backend.memory() is None and backend._memory is None
    finally:
        backend.close()


# -- a real memory cgroup ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit", [None, "100MB", "auto"])
def test_in_a_real_memory_cgroup_the_caller_survives(limit: str | None) -> None:
    import memory_cgroup

    cgroup = memory_cgroup.make_cgroup(limit=memory_cgroup.CGROUP_LIMIT)
    if cgroup is None:
        pytest.skip("needs root and a writable cgroup memory controller (v1 or v2)")
    try:
        outcome = memory_cgroup.run_in(cgroup, limited=limit or False)
    finally:
        memory_cgroup.remove(cgroup)
    big = memory_cgroup.TASKS // 10
    assert outcome["caller_survived"], outcome
    assert outcome["done"] == memory_cgroup.TASKS - big and outcome["failed"] == big
    if limit is None:  # the kernel kills the workers, never the caller, and we can tell
        assert outcome["kinds"] == {"WorkerCrashed": big}
        assert outcome["oom_verdicts"] == [True] * big
        assert outcome["oom_kills"] >= big
    else:  # stopped before the kernel had to
        assert outcome["kinds"] == {"MemoryLimitExceeded": big}
        assert outcome["oom_kills"] == 0
