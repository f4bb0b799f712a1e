"""``checkpoint=``: a rerun returns the journaled results and runs only what is missing, after a
clean end, a failure, Ctrl-C or SIGKILL of the caller; keys follow content, not position."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

import faults
import multitrack as mt


def _runs(log_dir: Path) -> list[int]:
    """The task values ``faults.logged_square`` ran, one entry per run, sorted."""
    return sorted(int(name.split("-")[0]) for name in os.listdir(log_dir))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


def _same(results: list[Any], expected: list[Any]) -> bool:
    """Equal, a TaskError standing for a TaskError at the same index."""
    return len(results) == len(expected) and all(
        (isinstance(r, mt.TaskError) and isinstance(e, mt.TaskError) and r.index == e.index)
        or r == e
        for r, e in zip(results, expected, strict=True)
    )


@pytest.mark.parametrize("backend", ["process", "thread", "serial"])
def test_a_rerun_returns_the_stored_results_and_runs_only_the_failures(
    tmp_path: Path, log_dir: Path, backend: str
) -> None:
    journal = tmp_path / "run.sqlite"
    work = functools.partial(faults.logged_square, log_dir=str(log_dir), bad=3)
    first = mt.map(work, range(10), checkpoint=journal, errors="return", backend=backend)
    assert _runs(log_dir) == list(range(10))
    second = mt.map(work, range(10), checkpoint=journal, errors="return", backend=backend)
    assert _same(second, first) and isinstance(second[3], mt.TaskError)
    assert _runs(log_dir) == sorted([*range(10), 3])  # only the failure ran again


def test_keys_follow_the_content_not_the_position(tmp_path: Path, log_dir: Path) -> None:
    journal = tmp_path / "run.sqlite"
    work = functools.partial(faults.logged_square, log_dir=str(log_dir))
    mt.map(work, [1, 2, 3], checkpoint=journal)
    # reordered, one inserted, one removed, one duplicated: only the new ones run
    assert mt.map(work, [3, 7, 1, 1], checkpoint=journal) == [9, 49, 1, 1]
    assert _runs(log_dir) == [1, 1, 2, 3, 7]  # 7 and the second 1 are new tasks


def test_a_users_key_names_the_tasks(tmp_path: Path, log_dir: Path) -> None:
    journal = tmp_path / "run.sqlite"
    work = functools.partial(faults.logged_square, log_dir=str(log_dir))
    mt.map(work, [1, 2], checkpoint=journal, key=lambda x: f"item-{x}")
    assert mt.map(work, [2, 1], checkpoint=journal, key=lambda x: f"item-{x}") == [4, 1]
    assert _runs(log_dir) == [1, 2]
    with pytest.raises(ValueError, match="checkpoint="):
        mt.map(work, [1], key=str)


def test_imap_yields_stored_results_in_input_order(tmp_path: Path, log_dir: Path) -> None:
    journal = tmp_path / "run.sqlite"
    work = functools.partial(faults.logged_square, log_dir=str(log_dir))
    mt.map(work, [0, 2, 4], checkpoint=journal)
    assert list(mt.imap(work, range(6), checkpoint=journal)) == [x * x for x in range(6)]
    assert _runs(log_dir) == [0, 1, 2, 3, 4, 5]


def test_a_changed_function_keeps_its_successes_and_reruns_its_failures(
    tmp_path: Path, log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = tmp_path / "run.sqlite"
    failing = functools.partial(faults.logged_square, log_dir=str(log_dir), bad=2)
    mt.map(failing, range(4), checkpoint=journal, errors="return")
    fixed = functools.partial(faults.logged_square_fixed, log_dir=str(log_dir), bad=2)
    assert mt.map(fixed, range(4), checkpoint=journal, progress="log") == [0, 1, 4, 9]
    assert _runs(log_dir) == [0, 1, 2, 2, 3]
    said = capsys.readouterr().err
    assert said.count("checkpoint:") == 1 and "running 1 failure again" in said, said
    with pytest.raises(mt.CheckpointError, match="refuse"):
        mt.map(failing, range(4), checkpoint=journal, on_change="refuse")
    assert _runs(log_dir) == [0, 1, 2, 2, 3]  # refused before any work
    mt.map(failing, range(4), checkpoint=journal, on_change="restart", errors="return")
    assert _runs(log_dir) == [0, 0, 1, 1, 2, 2, 2, 3, 3]  # started over


def test_a_journal_in_use_is_refused_before_any_work(tmp_path: Path, log_dir: Path) -> None:
    journal = tmp_path / "run.sqlite"
    work = functools.partial(faults.logged_square, log_dir=str(log_dir))
    running = mt.imap(work, range(3), checkpoint=journal)
    next(running)
    with pytest.raises(mt.CheckpointError, match="in use"):
        mt.map(work, [10, 11], checkpoint=journal)
    assert 10 not in _runs(log_dir)
    running.close()  # type: ignore[attr-defined]


KILLED = """
import functools, os, sys
sys.path.insert(0, {tests!r})
import faults, multitrack as mt
work = functools.partial(faults.logged_sleep, log_dir={log_dir!r}, seconds=0.01)
print(mt.map(work, range({n}), checkpoint={journal!r}, workers=2, progress=False)[:3])
"""


def _start(tmp_path: Path, log_dir: Path, n: int) -> subprocess.Popen[str]:
    code = KILLED.format(
        tests=str(Path(__file__).parent),
        log_dir=str(log_dir),
        n=n,
        journal=str(tmp_path / "run.sqlite"),
    )
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_runs(log_dir: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(os.listdir(log_dir)) < count and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_a_run_stopped_half_way_resumes_where_it_stopped(
    tmp_path: Path, log_dir: Path, how: str
) -> None:
    n = 400
    proc = _start(tmp_path, log_dir, n)
    _wait_for_runs(log_dir, n // 3)
    os.killpg(proc.pid, signal.SIGKILL if how == "SIGKILL" else signal.SIGINT)
    proc.communicate(timeout=30)
    time.sleep(0.2)  # a killed caller's workers see EOF and go
    ran_before = _runs(log_dir)
    assert 0 < len(ran_before) < n
    rerun = _start(tmp_path, log_dir, n)
    out, err = rerun.communicate(timeout=50)
    assert rerun.returncode == 0, err
    assert out.strip() == "[0, 1, 4]"
    ran_again = len(_runs(log_dir)) - len(ran_before)
    assert set(_runs(log_dir)) == set(range(n))
    missing = n - len(set(ran_before))
    # Ctrl-C stores every result that reached the caller: what ran again is what had not
    # finished, plus what finished in a worker but was not reported yet (a chunk or two).
    # SIGKILL loses at most the last commit interval (0.5 s: some 100 tasks of 10 ms here).
    slack = 60 if how == "SIGINT" else 160
    assert missing <= ran_again <= missing + slack, (ran_again, missing)


# -- how a run that starts a journal stores it (docs/performance.md) ---------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["process", "thread"])
def test_equal_inputs_keep_their_own_results(tmp_path: Path, backend: str) -> None:
    """A run that starts a journal keys nothing; its spans are keyed and numbered when the
    journal is next opened: each of several equal inputs gets its own result back."""
    journal = tmp_path / "run.sqlite"
    inputs = [1, 2, 1, 1, 2, 3] * 50
    first = mt.map(faults.pid_and_draw, inputs, checkpoint=journal, backend=backend)
    assert len({draw for _, draw in first}) == len(inputs)  # every task drew its own
    assert mt.map(faults.pid_and_draw, inputs, checkpoint=journal, backend=backend) == first
    longer = mt.map(faults.pid_and_draw, [*inputs, 1], checkpoint=journal, backend=backend)
    assert longer[:-1] == first and longer[-1] not in first  # only the new task ran


@pytest.mark.timeout(60)
def test_arguments_that_are_not_plain_data_are_keyed_when_stored(
    tmp_path: Path, log_dir: Path
) -> None:
    """Paths (and numpy arrays, a user's classes) are not stored as arguments: they are
    keyed span by span, and found again by content."""
    journal = tmp_path / "run.sqlite"
    work = functools.partial(faults.logged_square, log_dir=str(log_dir))
    length = functools.partial(_square_of_length, work=work)
    paths = [Path("a" * n) for n in (1, 2, 3)]
    assert mt.map(length, paths, checkpoint=journal) == [1, 4, 9]
    assert mt.map(length, [paths[2], Path("dddd"), paths[0]], checkpoint=journal) == [9, 16, 1]
    assert _runs(log_dir) == [1, 2, 3, 4]


def _square_of_length(path: Path, work: Any) -> int:
    return int(work(len(path.name)))


@pytest.mark.timeout(60)
def test_the_process_backend_stores_the_bytes_its_workers_pickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent pickles no result of a process worker again: it stores the worker's bytes
    (other backends pickle theirs, a span at a time)."""
    from multitrack import _resume

    def refuse(values: list[Any], skip: list[int]) -> bytes:
        raise AssertionError("the parent pickled results a process worker had pickled")

    monkeypatch.setattr(_resume, "_pickle_values", refuse)
    journal = tmp_path / "run.sqlite"
    assert mt.map(faults.square, range(2000), checkpoint=journal) == [x * x for x in range(2000)]
    assert mt.map(faults.square, range(2000), checkpoint=journal) == [x * x for x in range(2000)]


@pytest.mark.timeout(120)
def test_many_checkpointed_calls_keep_the_callers_memory_flat(tmp_path: Path) -> None:
    # Each rerun numbers equal inputs with a 16 MB Bloom filter: made of heap memory, it was
    # zeroed (all resident) and kept after each call, and a script of 255 small calls grew by
    # 300 MB. Its own process: the allocator's state is what is measured.
    from scripts import run_script

    out = run_script(
        tmp_path,
        f"""
        import multitrack as mt

        def rss_mb():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20

        def square(x):
            return x * x

        sizes = []
        for call in range(300):
            n = call % 50 + 1
            got = mt.map(square, range(n), workers=2, checkpoint={str(tmp_path / "j.sqlite")!r})
            assert got == [x * x for x in range(n)]
            if call in (50, 299):
                sizes.append(rss_mb())
        print(sizes[0], sizes[1])
        """,
    )
    at_50, at_300 = map(int, out.split())
    assert at_50 < 128 and at_300 - at_50 < 48, (at_50, at_300)  # about 30 and 0 here
