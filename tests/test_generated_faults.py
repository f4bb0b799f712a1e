"""Generated faults: hypothesis draws a mix of tasks that return, raise, exit, crash, hang,
print, or carry what cannot cross the process boundary, and call options to run them with; every
case must end within a bound computed from its plan, give the documented outcome for every input,
and leave no process behind.

Each input is a ``gen_faults.Plan`` that ``gen_faults.act`` interprets. The oracle follows the
README's failure model:

* ``errors="return"``: one result per input, in input order (``ordered=False``: compared as a
  set, by the tag each value and each ``TaskError.index`` carries); a failure is a ``TaskError``
  of the class its behaviour calls for, with its index, its arguments and ``attempts ==
  retries + 1`` (every failure drawn here is deterministic, so every attempt fails);
* ``errors="raise"``: the call raises the ``TaskError`` of one of the failing inputs, of the
  class that input's behaviour calls for; with no failing input, the results are right.

A hang is detected without hanging the test: a ``SIGALRM`` timer (armed around each call,
pytest-timeout's own timer saved and re-armed around it) raises ``Hang`` in the main thread,
where the scheduler waits; the call's ``finally`` then stops its workers.

The default profile is derandomized (the same cases on every run): 150 cases with workers
forked from the caller (``start_method="fork"``) and 60 with the default start (forks of the
zygote; fresh interpreters under ``MULTITRACK_WITHOUT=fork``), about a minute on this 2-core
machine when nothing fails (a failure adds hypothesis's shrinking: a few minutes). The long
profile draws random cases, 8,000 forked and 3,200 of the default start (roughly an hour)::

    MULTITRACK_FAULT_PROFILE=long python -m pytest -p no:cacheprovider \\
        tests/test_generated_faults.py

``MULTITRACK_FAULT_EXAMPLES=N`` sets the number of forked cases of either profile (fresh ones:
2/5 of it). The failures found so far are reproduced, minimal, in test_fault_regressions.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import faults
import gen_faults
import multitrack as mt
from gen_faults import BIG, Plan
from multitrack.backends import _start
from processes import live_children

# -- profiles -----------------------------------------------------------------------------

PROFILE = os.environ.get("MULTITRACK_FAULT_PROFILE", "default")
_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("multitrack-faults", derandomize=True, max_examples=150, **_COMMON)
settings.register_profile("multitrack-faults-long", max_examples=8000, **_COMMON)
_PROFILE_NAME = "multitrack-faults-long" if PROFILE == "long" else "multitrack-faults"
FORK_SETTINGS = settings(settings.get_profile(_PROFILE_NAME))
if os.environ.get("MULTITRACK_FAULT_EXAMPLES"):  # e.g. a quick look at a few cases
    FORK_SETTINGS = settings(
        FORK_SETTINGS, max_examples=int(os.environ["MULTITRACK_FAULT_EXAMPLES"])
    )
# Fresh interpreters cost ~100 ms each to start (more on a busy machine): fewer of those.
SPAWN_SETTINGS = settings(FORK_SETTINGS, max_examples=max(1, FORK_SETTINGS.max_examples * 2 // 5))
# pytest-timeout's limit per test: the cases, plus hypothesis shrinking a failure (it stops
# shrinking after about five minutes).
TEST_TIMEOUT = 4 * 3600 if PROFILE == "long" else 900

TIMEOUT = 0.5  # the ``timeout`` option, when one is drawn: well above the short sleeps
HANG_SECONDS = 30.0  # a "hang" task sleeps this long: only its timeout ends it
LEAK_GRACE = 3.0

# -- what each behaviour should give --------------------------------------------------------

CRASHES = {"os_exit", "sigkill", "segfault"}
FAILS_IN_CALLER_OR_WORKER = {"unpicklable_arg", "unloadable_arg"}
FAILING = {"raise", "sys_exit", "lock", "bad_init", "hang"} | CRASHES | FAILS_IN_CALLER_OR_WORKER


# What the error of a failing behaviour (crashes aside) must say, or carry as its __cause__.
SAYS: dict[str, Callable[[Plan, mt.TaskError], bool]] = {
    "raise": lambda plan, error: isinstance(error.__cause__, ValueError),
    "sys_exit": lambda plan, error: (
        isinstance(error.__cause__, SystemExit) and error.__cause__.code == plan.arg
    ),
    "bad_init": lambda plan, error: (
        isinstance(error.__cause__, mt.RemoteError)
        and error.__cause__.type_name == "faults.BadInit"
    ),
    "lock": lambda plan, error: "could not be pickled" in str(error),
    "unpicklable_arg": lambda plan, error: "FailsToPickle" in str(error),
    "unloadable_arg": lambda plan, error: "refuses to be unpickled" in str(error),
    "hang": lambda plan, error: isinstance(error, TimeoutError),
}


def expected_class(plan: Plan) -> type[mt.TaskError]:
    if plan.kind in CRASHES:
        return mt.WorkerCrashed
    if plan.kind == "hang":
        return mt.TaskTimeout
    return mt.TaskError


def expected_value(plan: Plan) -> Any:
    if plan.kind == "big_result":
        return ("big", plan.tag, b"x" * BIG)
    return gen_faults.value_of(plan)


def failure_problems(plan: Plan, error: BaseException, retries: int) -> list[str]:
    """What is wrong with ``error`` as the failure of ``plan`` (nothing: an empty list)."""
    want = expected_class(plan)
    if type(error) is not want:
        return [f"{plan!r}: expected {want.__name__}, got {type(error).__name__}: {error}"]
    assert isinstance(error, mt.TaskError)
    problems = []
    if error.index != plan.tag:
        problems.append(f"{plan!r}: index {error.index}")
    if error.task != plan:
        problems.append(f"{plan!r}: .task is {error.task!r}")
    if error.attempts != retries + 1:
        problems.append(f"{plan!r}: attempts {error.attempts}, retries={retries}: {error}")
    if plan.kind in CRASHES:
        assert isinstance(error, mt.WorkerCrashed)
        signame, exitcode = {
            "os_exit": (None, plan.arg),
            "sigkill": ("SIGKILL", None),
            "segfault": ("SIGSEGV", None),
        }[plan.kind]
        if (error.signal, error.exitcode) != (signame, exitcode):
            problems.append(f"{plan!r}: signal {error.signal}, exitcode {error.exitcode}")
    elif plan.kind in SAYS and not SAYS[plan.kind](plan, error):
        problems.append(f"{plan!r}: {error} (cause {error.__cause__!r})")
    return problems


# -- the cases ------------------------------------------------------------------------------


@dataclass
class Case:
    plans: list[Plan]
    api: str  # "map", "imap" (list() of it), or "pool" (two calls on one mt.Pool)
    workers: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def retries(self) -> int:
        return int(self.options["retries"])

    def __repr__(self) -> str:
        plans = ",\n    ".join(repr(plan) for plan in self.plans)
        return f"Case(api={self.api!r}, workers={self.workers}, {self.options},\n    {plans})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


# The first of each list is where hypothesis shrinks to: the plainest choice.
KINDS = [
    "value",
    "value",
    "raise",
    "sys_exit",
    "os_exit",
    "sigkill",
    "segfault",
    "sleep",
    "print",
    "lock",
    "bad_init",
    "big_result",
    "unpicklable_arg",
    "unloadable_arg",
]


@st.composite
def plans(draw: st.DrawFn, tag: int) -> Plan:
    kind = draw(st.sampled_from(KINDS))
    arg: Any = None
    payload: Any = None
    if kind == "sys_exit":
        arg = draw(st.sampled_from([1, 0, 3]))
    elif kind == "os_exit":
        arg = draw(st.sampled_from([7, 1, 0]))
    elif kind == "sleep":
        arg = draw(st.sampled_from([0.01, 0.05, 0.1]))
    elif kind == "print":
        arg = (draw(st.sampled_from(["stdout", "stderr"])), draw(st.sampled_from(["\n", ""])))
    if kind == "unpicklable_arg":
        payload = faults.FailsToPickle()
    elif kind == "unloadable_arg":
        payload = faults.FailsToUnpickle()
    elif draw(st.sampled_from([False, False, False, False, True])):
        payload = b"x" * BIG
    return Plan(tag, kind, arg, payload)


@st.composite
def cases(draw: st.DrawFn, *, spawn: bool) -> Case:
    timeout = draw(st.sampled_from([None, TIMEOUT]))
    count = draw(st.integers(1, 12))
    drawn = [draw(plans(tag)) for tag in range(count)]
    if timeout is not None:
        # A task past the timeout costs TIMEOUT per attempt: in few timed cases (the others
        # still run the timed path: one task at a time, each marked in the slot).
        for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 0, 0, 0, 1, 2]))):
            at = draw(st.integers(0, count - 1))
            payload = drawn[at].payload if isinstance(drawn[at].payload, bytes) else None
            drawn[at] = Plan(at, "hang", HANG_SECONDS, payload)
    # A Pool pays the fresh interpreters' start-up once for two calls: favour it there.
    apis = ["pool", "map", "imap"] if spawn else ["map", "imap", "pool"]
    return Case(
        plans=drawn,
        api=draw(st.sampled_from(apis)),
        workers=draw(st.integers(1, 3)),
        options={
            "chunksize": draw(st.sampled_from([None, 1, 2, 5])),
            "ordered": draw(st.booleans().map(lambda b: not b)),  # shrinks to True
            "errors": draw(st.sampled_from(["return", "raise"])),
            "retries": draw(st.integers(0, 2)),
            "timeout": timeout,
        },
    )


def time_bound(case: Case, *, spawn: bool) -> float:
    """Seconds one call of ``case`` may take, generously: start-up, every worker started
    again after a death or a timeout, the sleeps, the timeouts of every attempt, the large
    payloads; doubled, plus a margin for a busy shared machine."""
    attempts = case.retries + 1
    kinds = [plan.kind for plan in case.plans]
    deaths = sum(kind in CRASHES for kind in kinds) * (attempts + 1)  # +1: a block's death
    hangs = kinds.count("hang") * attempts
    starts = case.workers + deaths + hangs
    per_start = 0.5 if spawn else 0.05
    sleeps = sum(plan.arg for plan in case.plans if plan.kind == "sleep")
    bigs = sum(isinstance(plan.payload, bytes) for plan in case.plans) + kinds.count("big_result")
    work = starts * per_start + sleeps + hangs * (TIMEOUT + 0.3) + bigs * 0.2 * attempts
    return 5.0 + (3.0 if spawn else 0.0) + 2 * work


# -- running one case, with a bound -----------------------------------------------------------


class Hang(BaseException):
    """A call did not return within its bound (a BaseException: no `except Exception` in
    the library may swallow it)."""


@contextmanager
def alarm_after(seconds: float) -> Iterator[None]:
    """Raise ``Hang`` in the main thread after ``seconds`` (and every 2 s after that, in case
    the first one is swallowed), restoring pytest-timeout's handler and timer afterwards."""
    previous_handler = signal.getsignal(signal.SIGALRM)
    previous_left, _ = signal.getitimer(signal.ITIMER_REAL)
    started = time.monotonic()

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"no answer within {seconds:.1f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 2.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_left > 0:
            left = previous_left - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))


@dataclass
class Outcome:
    results: list[Any] | None = None
    raised: BaseException | None = None
    seconds: float = 0.0


def bounded(call: Callable[[], list[Any]], bound: float) -> Outcome:
    started = time.monotonic()
    outcome = Outcome()
    try:
        with alarm_after(bound):
            outcome.results = call()
    except Hang:
        raise
    except Exception as exc:
        outcome.raised = exc
    outcome.seconds = time.monotonic() - started
    return outcome


def run_case(case: Case, *, spawn: bool) -> list[Outcome]:
    act = gen_faults.act
    bound = time_bound(case, spawn=spawn)
    opts = case.options
    if case.api == "map":
        return [bounded(lambda: mt.map(act, case.plans, workers=case.workers, **opts), bound)]
    if case.api == "imap":
        return [
            bounded(lambda: list(mt.imap(act, case.plans, workers=case.workers, **opts)), bound)
        ]
    with mt.Pool(workers=case.workers) as pool:
        first = bounded(lambda: pool.map(act, case.plans, **opts), bound)
        second = bounded(lambda: list(pool.imap(act, case.plans, **opts)), bound)
    return [first, second]


# -- checking one outcome -------------------------------------------------------------------


def tag_of(result: Any) -> int | None:
    if isinstance(result, mt.TaskError):
        return result.index
    if isinstance(result, tuple) and len(result) == 3 and isinstance(result[1], int):
        return result[1]
    return None


def outcome_problems(case: Case, outcome: Outcome) -> list[str]:
    plans, retries = case.plans, case.retries
    failing = [plan for plan in plans if plan.kind in FAILING]
    if case.options["errors"] == "raise" and failing:
        error = outcome.raised
        if not isinstance(error, mt.TaskError):
            return [f"expected a TaskError of one of {failing}, got {error!r} / {outcome.results}"]
        if not 0 <= error.index < len(plans) or plans[error.index] not in failing:
            return [f"raised for index {error.index}, which does not fail: {error}"]
        return failure_problems(plans[error.index], error, retries)
    if outcome.raised is not None:
        return [f"raised {outcome.raised!r}; no TaskError expected to escape"]
    results = outcome.results
    assert results is not None
    if len(results) != len(plans):
        return [f"{len(results)} results for {len(plans)} inputs"]
    if not case.options["ordered"]:
        by_tag = {tag_of(result): result for result in results}
        if len(by_tag) != len(plans) or set(by_tag) != set(range(len(plans))):
            tags = [tag_of(result) for result in results]
            return [f"unordered results do not cover every input once: tags {tags}"]
        results = [by_tag[plan.tag] for plan in plans]
    problems = []
    for plan, result in zip(plans, results, strict=True):
        if plan.kind in FAILING:
            problems += failure_problems(plan, result, retries)
        elif result != expected_value(plan):
            shown = (
                f"{type(result).__name__}: {result}" if isinstance(result, BaseException) else ""
            )
            problems.append(f"{plan!r}: wrong result {shown or repr(result)[:200]}")
    return problems


def leftover_children() -> list[int]:
    """Children still running ``LEAK_GRACE`` seconds after the call (then killed, so that one
    leak does not fail every later case)."""
    deadline = time.monotonic() + LEAK_GRACE
    while live_children() and time.monotonic() < deadline:
        time.sleep(0.02)
    children = live_children()
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    return [child.pid for child in children]


@contextmanager
def start_path(*, spawn: bool) -> Iterator[None]:
    """The default start (forks of the zygote; fresh interpreters where fork is off), or
    ``start_method="fork"`` (forks of this process), for the whole case."""
    name = _start.START_METHOD_ENV
    saved = os.environ.get(name)
    os.environ[name] = "spawn" if spawn else "fork"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def check_case(case: Case, *, spawn: bool) -> None:
    with start_path(spawn=spawn):
        try:
            outcomes = run_case(case, spawn=spawn)
        except Hang as hang:
            leftover_children()
            pytest.fail(f"HANG ({hang}) on {case}")
    problems = []
    for number, outcome in enumerate(outcomes, 1):
        problems += [f"call {number}: {problem}" for problem in outcome_problems(case, outcome)]
    left = leftover_children()
    if left:
        problems.append(f"child processes left running after the call: {left}")
    assert not problems, f"{case}:\n" + "\n".join(problems)


# -- the tests ------------------------------------------------------------------------------


@pytest.mark.timeout(TEST_TIMEOUT)
@FORK_SETTINGS
@given(case=cases(spawn=False))
def test_generated_faults_with_forked_workers(case: Case) -> None:
    check_case(case, spawn=False)


@pytest.mark.timeout(TEST_TIMEOUT)
@SPAWN_SETTINGS
@given(case=cases(spawn=True))
def test_generated_faults_with_fresh_interpreters(case: Case) -> None:
    check_case(case, spawn=True)
