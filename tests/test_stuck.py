"""What a run that seems stuck is doing: the oldest running task on the bar, and every running
task's input, age and stack on demand (SIGUSR1 to the caller)."""

from __future__ import annotations

import functools
import os
import signal
import threading
from typing import Any

import pytest

import faults
import multitrack as mt
from multitrack import _stuck
from multitrack.backends._base import Running


class FakeBackend:
    def __init__(self) -> None:
        self.now_running: list[Running] = []

    def running(self) -> list[Running]:
        return self.now_running

    def stack(self, worker: int) -> str | None:
        return f'  File "job.py", line {worker} in resize'


def make_watch(clock: list[float], typical: float | None) -> tuple[Any, FakeBackend, list[Any]]:
    backend = FakeBackend()
    shown: list[Any] = []
    tasks = {(7, 0): (17, "a.png"), (8, 1): (18, "b.png")}
    watch = _stuck.Stuck(
        backend,  # type: ignore[arg-type]
        lambda chunk, position: tasks.get((chunk, position)),
        lambda arg: arg,
        lambda: typical,
        shown.append,
        shown.append,
        lambda: clock[0],
    )
    return watch, backend, shown


def test_the_bar_names_a_task_running_far_longer_than_usual() -> None:
    clock = [100.0]
    watch, backend, shown = make_watch(clock, typical=2.0)
    backend.now_running = [Running(1, 7, 0, 95.0), Running(2, 8, 1, 99.0)]
    watch.step()
    assert shown == []  # 5 s: not yet ten times the usual 2 s
    clock[0] = 116.0
    watch.step()
    assert shown == ["task 17 running 21 s"]
    clock[0] = 116.5
    watch.step()
    assert shown == ["task 17 running 21 s"]  # looked at once a second, not at every step
    backend.now_running = [Running(2, 8, 1, 115.0)]
    clock[0] = 118.0
    watch.step()
    assert shown[-1] is None  # it finished: the word goes


def test_the_dump_lists_every_running_task_with_its_age_and_stack() -> None:
    clock = [100.0]
    watch, backend, _ = make_watch(clock, typical=None)
    backend.now_running = [Running(1, 7, 0, 97.5), Running(2, 8, 1, 90.0)]
    lines = watch.dump().splitlines()
    assert lines[0] == "multitrack: 2 tasks running"
    assert lines[1] == "  task 18 (input 'b.png'): running 10.0 s"  # the oldest first
    assert "job.py" in lines[2] and "task 17 (input 'a.png'): running 2.5 s" in lines[3]


@pytest.mark.timeout(30)
def test_sigusr1_to_the_caller_prints_what_runs_without_stopping_it(
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        hang = functools.partial(faults.sleep_on, seconds=2.5, bad=1)
        assert mt.map(hang, [0, 1, 2], workers=2) == [0, 1, 2]  # not stopped
    finally:
        timer.join()
    err = capfd.readouterr().err
    assert "1 task running" in err and "task 1 (input 1): running" in err
    assert "in sleep_on" in err
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # given back


def test_a_handler_of_the_callers_own_is_left_alone() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        assert mt.map(faults.square, [1, 2]) == [1, 4]
        assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
