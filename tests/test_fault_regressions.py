"""Minimal reproductions of the failures ``test_generated_faults`` found, one test each.

Each is marked ``xfail(strict=True)`` while the bug is there: the day it is fixed, the test
passes, strict xfail turns that into a failure, and the marker is removed."""

from __future__ import annotations

import pytest

import faults
import multitrack as mt
from gen_faults import Plan, act

pytestmark = pytest.mark.usefixtures("each_start_method")

BIG = b"x" * (4 << 20)  # larger than a worker's socket buffer: held back while it is busy


@pytest.mark.timeout(20)
@pytest.mark.xfail(
    strict=True,
    reason="bug: an argument that fails to unpickle in the worker (chunk_error on a one-task "
    "chunk) never releases the chunk held back behind it (a multi-MB argument): map hangs",
)
def test_argument_failing_to_unpickle_releases_the_large_argument_held_back_behind_it() -> None:
    results = mt.map(
        faults.type_name, [faults.FailsToUnpickle(), BIG], workers=1, chunksize=1, errors="return"
    )
    assert isinstance(results[0], mt.TaskError) and results[1] == "bytes"


@pytest.mark.timeout(20)
@pytest.mark.xfail(
    strict=True,
    reason="bug: a task whose result cannot be pickled, in a block of quick tasks with tasks "
    "that crash their worker, is itself blamed for a crash (WorkerCrashed) after retries",
)
def test_unpicklable_result_next_to_crashing_tasks_is_not_blamed_for_their_crash() -> None:
    plans = [Plan(0, "sigkill"), Plan(1, "lock"), Plan(2, "sigkill")]
    results = mt.map(act, plans, workers=1, chunksize=2, retries=1, errors="return")
    assert [type(r) for r in results] == [mt.WorkerCrashed, mt.TaskError, mt.WorkerCrashed]
    assert "could not be pickled" in str(results[1]) and results[1].attempts == 2


@pytest.mark.timeout(20)
@pytest.mark.xfail(
    strict=True,
    reason="bug: when the last item of a chunk resent one by one (after its arguments failed to "
    "unpickle) fails to unpickle too, the chunk held back behind it is never sent: map hangs",
)
def test_chunk_split_after_an_unpickling_failure_releases_the_chunk_held_back_behind_it() -> None:
    inputs = [1, faults.FailsToUnpickle(), BIG]
    results = mt.map(faults.type_name, inputs, workers=1, chunksize=2, errors="return")
    assert results[0] == "int" and isinstance(results[1], mt.TaskError)
    assert results[2] == "bytes"


@pytest.mark.timeout(20)
@pytest.mark.xfail(
    strict=True,
    reason="bug: with retries, a task that crashes its worker is reported with the signal or "
    "exit code of another task's crash (blamed for it as a suspect of a block)",
)
def test_each_crash_is_reported_with_its_own_signal_and_exit_code_after_retries() -> None:
    plans = [Plan(0, "sigkill"), Plan(1, "os_exit", 7)]
    results = mt.map(act, plans, workers=1, chunksize=2, retries=2, errors="return")
    crashes = [(type(r), r.signal, r.exitcode, r.attempts) for r in results]
    assert crashes == [(mt.WorkerCrashed, "SIGKILL", None, 3), (mt.WorkerCrashed, None, 7, 3)]
