"""The scheduler's policy against an in-memory backend and a fake clock: no processes, no
sleeps. Deadlines, retries, blame, ordering and memory bounds are checked here in
milliseconds; the real backends are checked end to end elsewhere."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from multitrack._chunks import (
    MAX_CHUNK,
    MAX_CHUNK_BYTES,
    MIN_TAIL_SECONDS,
    TARGET_SECONDS,
    ChunkSizer,
)
from multitrack._errors import TaskError, TaskTimeout, WorkerCrashed
from multitrack._run import MAX_BYSTANDER_REQUEUES, Policy, Run
from multitrack.backends._base import (
    Backend,
    Chunk,
    Event,
    GivenBack,
    Lost,
    Output,
    Running,
    completed_from_outcomes,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Script:
    """What a fake task does, decided by its argument."""

    OK, RAISE, CRASH, HANG, DIE_BETWEEN = "ok", "raise", "crash", "hang", "die-between"
    CRASH_IN_BLOCK = "crash-in-block"  # like the process backend's blocks of quick tasks
    BLOCK = 4


class FakeBackend(Backend):
    """Runs a chunk per worker per poll. A task's argument says what it does:
    ``("ok", value)``, ``("raise", exc)``, ``("crash",)`` (its worker dies while running
    it), ``("hang",)`` (runs until killed), ``("die-between",)`` (its worker dies before
    starting it), ``("crash-in-block",)`` (its worker dies while running a block of
    ``Script.BLOCK`` tasks marked as one: the block's earlier tasks finished, unreported).
    Each task takes ``seconds`` of fake time."""

    can_kill = True

    def __init__(self, clock: FakeClock, slots: int = 2, seconds: float = 0.01) -> None:
        self.clock, self.slots, self.seconds = clock, slots, seconds
        self.queues: dict[int, list[Chunk]] = {w: [] for w in range(slots)}
        self.hung: dict[int, tuple[Chunk, int, float]] = {}
        self.submitted: list[Chunk] = []
        self.events: list[Event] = []
        self.polls: list[float | None] = []
        self.ended: bool | None = None
        self.closed = False
        self.next_pid = 100
        self.run: Run | None = None  # checked at every poll

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        self.fn = fn

    def capacity(self) -> int:
        return sum(2 - len(q) for w, q in self.queues.items() if w not in self.hung)

    def submit(self, chunk: Chunk) -> None:
        self.submitted.append(chunk)
        worker = min(
            (w for w in self.queues if w not in self.hung), key=lambda w: len(self.queues[w])
        )
        self.queues[worker].append(chunk)

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if self.run is not None:  # the scheduler applied every earlier event by now
            assert_every_task_is_in_one_place(self.run)
        self.polls.append(timeout)
        events, self.events = self.events, []
        for worker, queue in self.queues.items():
            if queue and worker not in self.hung:
                events.extend(self._run(worker, queue))
        if not events and timeout is None:
            raise AssertionError("poll(None) with nothing to report: a real wait never ends")
        if not events and timeout is not None:
            self.clock.now += timeout  # nothing happens until the wait runs out
        return events

    def _run(self, worker: int, queue: list[Chunk]) -> list[Event]:
        chunk = queue[0]
        outcomes: list[tuple[int, bool, Any]] = []
        for position, args in enumerate(chunk.args):
            kind = args[0]
            if kind == Script.HANG:
                self.hung[worker] = (chunk, position, self.clock.now)
                return list(completed_from_outcomes(chunk.id, outcomes, 0.0))
            if kind in (Script.CRASH, Script.DIE_BETWEEN):
                running = (chunk.id, position) if kind == Script.CRASH else None
                lost = Lost(worker, [c.id for c in queue], running, -9, self.next_pid)
                self.next_pid += 1
                queue.clear()
                return [*completed_from_outcomes(chunk.id, outcomes, 0.0), lost]
            if kind == Script.CRASH_IN_BLOCK:
                block = position - position % Script.BLOCK
                span = min(Script.BLOCK, len(chunk.args) - block)
                reported = [outcome for outcome in outcomes if outcome[0] < block]
                lost = Lost(worker, [c.id for c in queue], (chunk.id, block), -9, 1, span=span)
                queue.clear()
                return [*completed_from_outcomes(chunk.id, reported, 0.0), lost]
            self.clock.now += self.seconds
            if kind == Script.RAISE:
                outcomes.append((position, False, args[1]))
            else:
                outcomes.append((position, True, self.fn(args)))
        queue.pop(0)
        return list(completed_from_outcomes(chunk.id, outcomes, self.seconds * len(outcomes)))

    def running(self) -> list[Running]:
        return [Running(w, c.id, p, t) for w, (c, p, t) in self.hung.items()]

    def kill(self, worker: int) -> None:
        chunk, position, _ = self.hung.pop(worker)
        queue = self.queues[worker]
        self.events.append(Lost(worker, [c.id for c in queue], (chunk.id, position), -9, 1, True))
        queue.clear()

    def end(self, *, abort: bool) -> None:
        self.ended = abort

    def close(self, *, kill: bool = False) -> None:
        self.closed = True


class RecordingProgress:
    def __init__(self) -> None:
        self.completed = self.failed = self.retried = self.reused = 0
        self.total: int | None = None
        self.outcome: str | None = None
        self.lines: list[str] = []

    @property
    def done(self) -> int:
        return self.completed

    def advance(self, n: int = 1) -> None:
        self.completed += n

    def add_failed(self, n: int = 1) -> None:
        self.failed += n

    def add_retried(self, n: int = 1) -> None:
        self.retried += n

    def set_status(self, text: str | None) -> None:
        self.status = text

    def set_total(self, total: int | None) -> None:
        self.total = total

    def write(self, text: str, *, stream: str = "stdout") -> None:
        self.lines.append(text)

    def wakeup_in(self) -> float | None:
        return None

    def tick(self) -> None:
        pass

    def close(self, outcome: str = "done") -> None:
        self.outcome = outcome


def ok(value: Any) -> tuple[str, Any]:
    return (Script.OK, value)


def value_of(arg: tuple[str, Any]) -> Any:
    return arg[1]


def make_run(
    inputs: Iterator[Any] | list[Any],
    *,
    clock: FakeClock | None = None,
    backend: FakeBackend | None = None,
    ordered: bool = True,
    chunksize: int | None = 1,
    max_ahead: int | None = None,
    total: int | None = None,
    **policy: Any,
) -> tuple[Run, FakeBackend, RecordingProgress]:
    clock = clock or FakeClock()
    backend = backend or FakeBackend(clock)
    progress = RecordingProgress()
    run = Run(
        backend,
        value_of,
        iter(inputs),
        total=total,
        ordered=ordered,
        sizer=ChunkSizer(fixed=chunksize, slots=backend.slots),
        policy=Policy(**policy),
        progress=progress,  # type: ignore[arg-type]
        describe=lambda arg: arg,
        max_ahead=max_ahead,
        owns_backend=True,
        clock=clock,
    )
    backend.run = run
    return run, backend, progress


def assert_every_task_is_in_one_place(run: Run) -> None:
    """Every task pulled so far is either unsettled, in exactly one place of the ledger, or
    settled: held for release, or released."""
    unsettled = run.ledger.unsettled()
    assert len(unsettled) == len(set(unsettled)), f"a task in two places: {sorted(unsettled)}"
    if run.order.ordered:
        held = run.order.held_indices()
        released = set(range(run.order.released))
        places = [set(unsettled), held, released]
        assert sum(map(len, places)) == run.pulled, (places, run.pulled)
        assert set().union(*places) == set(range(run.pulled))
    else:
        held = len(run.order._ready)
        assert len(unsettled) + held + run.order.released == run.pulled


@pytest.mark.parametrize("chunksize", [1, 3, None])
@pytest.mark.parametrize("ordered", [True, False])
def test_every_input_yields_one_result(chunksize: int | None, ordered: bool) -> None:
    run, backend, progress = make_run(
        [ok(i) for i in range(50)], ordered=ordered, chunksize=chunksize
    )
    results = list(run)
    assert (results if ordered else sorted(results)) == list(range(50))
    assert progress.done == 50
    assert progress.outcome == "done"
    assert backend.ended is False and backend.closed


def test_return_mode_keeps_failures_in_their_slots() -> None:
    boom = ValueError("boom")
    run, _, progress = make_run([ok(0), (Script.RAISE, boom), ok(2)], errors="return")
    results = list(run)
    assert results[0] == 0 and results[2] == 2
    error = results[1]
    assert isinstance(error, TaskError) and error.index == 1 and error.__cause__ is boom
    assert progress.failed == 1 and progress.done == 3
    assert "2 ok · 1 failed (1 ValueError)" in progress.lines[0]  # the end-of-run report


def test_raise_mode_stops_at_first_failure_and_aborts_workers() -> None:
    pulled = []

    def inputs() -> Iterator[Any]:
        for i in itertools.count():
            pulled.append(i)
            yield (Script.RAISE, KeyError(i)) if i == 3 else ok(i)

    run, backend, progress = make_run(inputs())
    with pytest.raises(TaskError) as caught:
        list(run)
    assert caught.value.index == 3
    assert isinstance(caught.value.__cause__, KeyError)
    assert backend.ended is True and backend.closed
    assert progress.outcome == "error"
    assert len(pulled) < 10  # intake stopped: an endless input did not run on


def test_crash_is_blamed_on_the_one_running_task_and_the_rest_rerun() -> None:
    inputs = [ok(i) for i in range(12)]
    inputs[5] = (Script.CRASH,)
    run, backend, _ = make_run(inputs, chunksize=4, errors="return")
    results = list(run)
    assert isinstance(results[5], WorkerCrashed)
    assert results[5].signal == "SIGKILL" and results[5].exitcode is None
    assert "out-of-memory" in str(results[5])
    assert [r for i, r in enumerate(results) if i != 5] == [i for i in range(12) if i != 5]
    # the innocent tasks of the lost chunks were submitted again
    assert sum(4 in c.indices for c in backend.submitted) == 1
    assert sum(6 in c.indices for c in backend.submitted) == 2


def test_crash_in_a_block_of_quick_tasks_reruns_its_suspects_alone_then_blames_one() -> None:
    inputs = [ok(i) for i in range(12)]
    inputs[5] = (Script.CRASH_IN_BLOCK,)
    run, backend, progress = make_run(inputs, chunksize=8, errors="return")
    results = list(run)
    crashed = results[5]
    assert isinstance(crashed, WorkerCrashed) and crashed.index == 5
    assert crashed.attempts == 1  # the first death was nobody's: it used no attempt
    assert [r for i, r in enumerate(results) if i != 5] == [i for i in range(12) if i != 5]
    assert progress.failed == 1 and progress.done == 12
    # The block (positions 4-7) ran again one task per chunk; its neighbours were not isolated
    alone = {c.indices[0] for c in backend.submitted if len(c.indices) == 1}
    assert alone == {4, 5, 6, 7}


class HandingBackBackend(FakeBackend):
    """Hands back, unstarted, the second half of the waiting chunk of the first worker that
    holds two (once; as a worker asked by ``give_back`` would)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.handed: list[int] = []

    def poll(self, timeout: float | None) -> Sequence[Event]:
        self._hand_back_once()
        return super().poll(timeout)

    def _hand_back_once(self) -> None:
        if self.handed:
            return
        for queue in self.queues.values():
            if len(queue) == 2:
                chunk = queue[1]
                half = len(chunk.indices) // 2
                queue[1] = Chunk(chunk.id, chunk.indices[:half], chunk.args[:half])
                self.handed = list(chunk.indices[half:])
                self.events.append(GivenBack(chunk.id, half))
                return


def test_tasks_handed_back_run_once_more_as_one_chunk() -> None:
    clock = FakeClock()
    backend = HandingBackBackend(clock)
    run, _, progress = make_run([ok(i) for i in range(40)], backend=backend, chunksize=6)
    assert list(run) == list(range(40))
    assert progress.done == 40
    assert backend.handed, "the test's backend never handed anything back"
    again = [c for c in backend.submitted if backend.handed[0] in c.indices]
    assert len(again) == 2 and list(again[1].indices) == backend.handed


def test_worker_dying_between_tasks_cannot_requeue_forever() -> None:
    run, _, _ = make_run([ok(0), (Script.DIE_BETWEEN,), ok(2)], errors="return")
    results = list(run)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], WorkerCrashed)
    assert results[1].attempts == 1


def test_bystander_requeues_are_bounded() -> None:
    assert MAX_BYSTANDER_REQUEUES >= 1


def test_timeout_kills_the_hung_task_and_waits_exactly_until_its_deadline() -> None:
    clock = FakeClock()
    run, backend, progress = make_run(
        [ok(0), (Script.HANG,), ok(2)], clock=clock, timeout=5.0, errors="return"
    )
    start = clock.now
    results = list(run)
    assert results[0] == 0 and results[2] == 2
    assert isinstance(results[1], TaskTimeout) and isinstance(results[1], TimeoutError)
    assert "timed out after 5 s" in str(results[1])
    assert clock.now - start == pytest.approx(5.0 + 0.02, abs=0.05)
    assert all(p is None or p <= 5.0 for p in backend.polls)
    assert progress.failed == 1


def test_retries_rerun_failures_and_count_attempts() -> None:
    attempts: dict[int, int] = {}

    def flaky(arg: tuple[str, int]) -> int:
        attempts[arg[1]] = attempts.get(arg[1], 0) + 1
        if arg[1] == 1 and attempts[1] < 3:
            raise OSError("flaky")
        return arg[1]

    clock = FakeClock()
    backend = FakeBackend(clock)
    run, _, progress = make_run([ok(0), ok(1), ok(2)], backend=backend, retries=2)
    run.fn = flaky

    def as_outcomes(worker: int, queue: list[Chunk]) -> list[Event]:
        chunk = queue.pop(0)
        outcomes: list[tuple[int, bool, Any]] = []
        for position, args in enumerate(chunk.args):
            try:
                outcomes.append((position, True, flaky(args)))
            except OSError as exc:
                outcomes.append((position, False, exc))
        return list(completed_from_outcomes(chunk.id, outcomes, 0.0))

    backend._run = as_outcomes  # type: ignore[method-assign]
    assert list(run) == [0, 1, 2]
    assert attempts[1] == 3 and progress.retried == 2


def test_retries_exhausted_report_attempts() -> None:
    run, _, progress = make_run([(Script.RAISE, OSError("always"))], retries=2, errors="return")
    [error] = list(run)
    assert isinstance(error, TaskError) and error.attempts == 3
    assert "after 3 attempts" in str(error)
    assert progress.retried == 2 and progress.failed == 1


def test_retry_delay_is_respected_with_backoff() -> None:
    clock = FakeClock()
    run, _, _ = make_run(
        [(Script.RAISE, OSError("x"))], clock=clock, retries=2, retry_delay=1.0, errors="return"
    )
    start = clock.now
    list(run)
    # first retry after 1 s, second after 2 s more (plus three 10 ms task runs)
    assert clock.now - start == pytest.approx(3.03, abs=0.05)


def test_timed_out_task_can_be_retried() -> None:
    run, _, progress = make_run([(Script.HANG,)], timeout=1.0, retries=1, errors="return")
    [error] = list(run)
    assert isinstance(error, TaskTimeout) and error.attempts == 2
    assert progress.retried == 1


def test_ordered_imap_stops_pulling_when_too_far_ahead_of_a_slow_head() -> None:
    pulled = []

    def inputs() -> Iterator[Any]:
        yield (Script.HANG,)
        for i in itertools.count(1):
            pulled.append(i)
            yield ok(i)

    run, _, _ = make_run(inputs(), max_ahead=20, timeout=60.0, errors="return")
    iterator = iter(run)
    assert isinstance(next(iterator), TaskTimeout)  # released only once the head settles
    assert len(pulled) <= 20 + 4  # intake paused at the bound instead of filling memory
    iterator.close()


def test_intake_resumes_when_the_window_was_full_and_all_of_it_finished_at_once() -> None:
    # The window (max_ahead) is exactly full, and one poll settles every task in flight:
    # release must reopen intake before the next wait, or nothing is in flight, nothing is
    # pulled, and the wait never ends (a real hang, seen on 200,000 trivial tasks).
    run, _, _ = make_run((ok(i) for i in range(40)), max_ahead=4, chunksize=2)
    assert list(run) == list(range(40))


def test_input_is_pulled_lazily() -> None:
    pulled = []

    def inputs() -> Iterator[Any]:
        for i in itertools.count():
            pulled.append(i)
            yield ok(i)

    iterator = iter(make_run(inputs(), max_ahead=100)[0])
    assert [next(iterator) for _ in range(5)] == list(range(5))
    assert len(pulled) < 20
    iterator.close()


def test_closing_imap_half_way_aborts_the_backend() -> None:
    run, backend, progress = make_run([ok(i) for i in range(100)])
    iterator = iter(run)
    next(iterator)
    iterator.close()
    assert backend.ended is True and backend.closed
    assert progress.outcome == "closed"  # the caller left: not a failure


def test_total_is_corrected_when_the_input_is_shorter_than_its_hint() -> None:
    run, _, progress = make_run([ok(i) for i in range(3)], total=10)
    assert list(run) == [0, 1, 2]
    assert progress.total == 3


# -- chunk sizing ---------------------------------------------------------------------------


def test_auto_chunks_start_at_one_then_target_the_measured_time() -> None:
    sizer = ChunkSizer(fixed=None, slots=2)
    assert sizer.next_size(None) == 1
    sizer.observe(10, 10 * 0.001)  # 1 ms per task
    assert sizer.next_size(None) == int(TARGET_SECONDS / 0.001)
    sizer.observe(1, 1.0)  # tasks got much slower: the estimate follows
    assert sizer.next_size(None) < int(TARGET_SECONDS / 0.001)


def test_a_slow_first_task_does_not_keep_chunks_small() -> None:
    # The first task pays first-call costs (60 us here); the next thousand take 0.2 us each.
    sizer = ChunkSizer(fixed=None, slots=2)
    sizer.observe(1, 60e-6)
    sizer.observe(1000, 200e-6)
    assert sizer.next_size(None) == MAX_CHUNK


def test_auto_chunks_are_capped_and_shrink_at_the_end() -> None:
    sizer = ChunkSizer(fixed=None, slots=2)
    sizer.observe(10, 10 * 0.001)  # 1 ms per task
    assert sizer.next_size(None) == int(TARGET_SECONDS / 0.001)
    assert sizer.next_size(100) == 25  # leave work for every worker's two chunks
    floor = int(MIN_TAIL_SECONDS / 0.001)
    assert sizer.next_size(8) == floor  # but not below a few ms of work
    assert sizer.next_size(floor - 1) == floor - 1
    assert sizer.next_size(1) == 1


def test_the_tail_of_tiny_tasks_is_not_cut_into_tiny_chunks() -> None:
    sizer = ChunkSizer(fixed=None, slots=2)
    sizer.observe(1000, 1e-6)  # 1 ns per task
    assert sizer.next_size(None) == MAX_CHUNK
    assert sizer.next_size(100_000) == MAX_CHUNK
    assert sizer.next_size(100) == 100  # far less than MIN_TAIL_SECONDS of work: one chunk


def test_auto_chunks_stay_under_the_byte_budget() -> None:
    sizer = ChunkSizer(fixed=None, slots=2)
    sizer.observe(10, 10 * 0.001)  # 1 ms per task: 50 tasks a chunk by time
    sizer.observe_sent(2, 16 * 1024 * 1024)  # 8 MB of arguments per task
    assert sizer.next_size(None) == MAX_CHUNK_BYTES // (8 * 1024 * 1024)
    for _ in range(40):  # the arguments got small: the cap follows
        sizer.observe_sent(50, 50 * 100)
    assert sizer.next_size(None) == int(TARGET_SECONDS / 0.001)
    fixed = ChunkSizer(fixed=50, slots=2)
    fixed.observe_sent(2, 16 * 1024 * 1024)
    assert fixed.next_size(None) == 50  # the user's chunksize is the user's


def test_fixed_chunksize_and_cap() -> None:
    assert ChunkSizer(fixed=7, slots=2).next_size(3) == 7
    assert ChunkSizer(fixed=7, slots=2, cap=5).next_size(None) == 5


def test_unknown_culprit_in_a_lost_chunk_is_isolated_and_then_blamed_alone() -> None:
    # The worker dies before running any task of its chunk (a death while unpickling, say):
    # the culprit is unknown, so each task of that chunk runs alone next time.
    inputs = [ok(0), ok(1), ok(2), (Script.DIE_BETWEEN,), ok(4), ok(5)]
    run, backend, _ = make_run(inputs, chunksize=3, errors="return")
    results = list(run)
    assert isinstance(results[3], WorkerCrashed)
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    reruns = [c.indices for c in backend.submitted[2:]]
    assert [3] in reruns and [4] in reruns and [5] in reruns  # each ran on its own
