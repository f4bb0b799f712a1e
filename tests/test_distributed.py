"""backend="dask" and backend="ray": the same contract and the same fault model as the local
backends, on real local clusters.

One cluster per engine for the whole module (a Ray start costs seconds; no other module uses
them, so that is one per test session), handed to the calls through ``address=`` / ``client=``
so multitrack attaches instead of starting its own; one test per engine lets multitrack start
and stop a cluster of its own. The shared clusters' own processes and threads live across
tests, so this module replaces the suite's leftover guard with one that tolerates exactly
those (and still catches anything else). Module scope, not session scope: the suite's guard in
the modules that run after this one would see a session cluster as a leak.

Run only these: ``pytest -m "dask or ray"``; skipped when the extras are not installed.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import faults
import multitrack as mt
from processes import live_children

ENGINES = [
    pytest.param("dask", marks=pytest.mark.dask),
    pytest.param("ray", marks=pytest.mark.ray),
]
GRACE = 5.0  # seconds a child or thread of a call may take to go away


# -- the session clusters -----------------------------------------------------------------


class _Session:
    """A cluster shared by this module's tests: what the calls need to attach to it, and
    how to recognise its own processes."""

    def __init__(self, options: dict[str, Any], roots: set[int]) -> None:
        self.options = options
        self.roots = roots  # processes it started directly (their descendants are its own)
        self.current_pids: Any = lambda: set()
        _LIVE_SESSIONS.append(self)

    def ended(self) -> None:
        _LIVE_SESSIONS.remove(self)


_LIVE_SESSIONS: list[_Session] = []


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


@pytest.fixture(scope="module")
def ray_session() -> Iterator[_Session]:
    ray = pytest.importorskip("ray")
    before = _children()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    session = _Session(
        {"backend": "ray", "address": ray.get_runtime_context().gcs_address},
        _children() - before,
    )
    mt.map(faults.square, range(4), workers=2, **session.options)  # warm: driver threads
    yield session
    session.ended()
    ray.shutdown()


@pytest.fixture(scope="module")
def dask_session() -> Iterator[_Session]:
    pytest.importorskip("distributed")
    from multiprocessing import resource_tracker

    import dask
    from distributed import Client, LocalCluster

    tracker_was_running = getattr(resource_tracker._resource_tracker, "_pid", None) is not None
    before = _children()
    # A cluster the user configured for exact blame: allowed-failures 0, as multitrack sets
    # on clusters of its own (dask's default 3 would run a self-killing task on 4 workers).
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        )
    client = Client(cluster, set_as_default=False)
    session = _Session({"backend": "dask", "client": client}, _children() - before)
    session.current_pids = lambda: {nanny.pid for nanny in cluster.workers.values()}
    mt.map(faults.square, range(4), workers=2, **session.options)  # warm: driver threads
    yield session
    session.ended()
    client.close()
    cluster.close()
    if not tracker_was_running:  # spawn started it for the cluster: the suite's guard would
        resource_tracker._resource_tracker._stop()  # see it in the next module


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def on(engine: str, request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Options that run a call on the shared cluster of ``engine``, with 2 slots. After the
    test, a dask cluster is given time to finish restarting the workers the test had killed,
    so the next test starts on two live workers (and the nanny's threads for the new worker
    processes are not charged to it)."""
    session: _Session = request.getfixturevalue(f"{engine}_session")
    yield {**session.options, "workers": 2}
    if engine == "dask":
        client = session.options["client"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = client.scheduler_info()["workers"].values()
            if sum(w.get("status") == "running" for w in workers) == 2:
                break
            time.sleep(0.1)


@pytest.fixture(autouse=True)
def no_leftovers(request: pytest.FixtureRequest) -> Iterator[None]:
    """The suite's guard, minus the session clusters: after each test, no child process and
    no thread may be left, except the session clusters' own processes (and their
    descendants: Ray's workers are children of its raylet) and threads that existed before
    the test."""
    for name in ("ray_session", "dask_session"):
        if name in request.fixturenames or _engine_of(request) == name.partition("_")[0]:
            request.getfixturevalue(name)  # started before the snapshot, not inside the test
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + GRACE
    while True:
        children, threads = _strays(_LIVE_SESSIONS), _new_threads(threads_before)
        if not (children or threads) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    assert not children, f"child processes left behind: {[_describe(c) for c in children]}"
    assert not threads, f"threads left behind: {[t.name for t in threads]}"


def _engine_of(request: pytest.FixtureRequest) -> str | None:
    callspec = getattr(request.node, "callspec", None)
    return None if callspec is None else callspec.params.get("engine")


def _strays(sessions: list[_Session]) -> list[psutil.Process]:
    own: set[int] = set()
    for session in sessions:
        for pid in session.roots | session.current_pids():
            own.add(pid)
            try:
                own.update(p.pid for p in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
    return [child for child in live_children() if child.pid not in own]


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return str(process.pid)


# Threads a shared dask cluster's nannies start when they restart a worker process (one
# test's kill is finished in the background): the cluster's own, like that process; and
# distributed's process-wide offload thread, started once on first use. If multitrack leaked a
# cluster, its worker processes would still be caught above.
_NANNY_THREADS = ("AsyncProcess Dask Worker process (from Nanny)", "QueueFeederThread")
_DASK_OFFLOAD = "Dask-Offload"


def _new_threads(before: set[int | None]) -> list[threading.Thread]:
    return [
        t
        for t in threading.enumerate()
        if t.ident not in before
        and t.is_alive()
        and not t.name.startswith(_DASK_OFFLOAD)
        and not (_LIVE_SESSIONS and t.name.startswith(_NANNY_THREADS))
    ]


# -- the contract -------------------------------------------------------------------------


def test_results_equal_builtin_map(on: dict[str, Any]) -> None:
    inputs = list(range(300))
    expected = [x * x for x in inputs]
    assert mt.map(faults.square, inputs, **on) == expected
    assert sorted(mt.imap(faults.square, inputs, ordered=False, **on)) == expected
    assert mt.map(faults.add, range(10), iter(range(100, 105)), **on) == [
        100,
        102,
        104,
        106,
        108,
    ]
    assert mt.starmap(faults.add, [(1, 2), (3, 4)], chunksize=1, **on) == [3, 7]
    assert mt.map(faults.square, [], **on) == []
    offset = 10
    assert mt.map(lambda x: x + offset, range(3), **on) == [10, 11, 12]  # by value


def test_a_function_of_a_module_made_at_run_time_reaches_the_workers(
    on: dict[str, Any],
) -> None:
    # A plugin loaded by path, or code made at run time: the workers cannot import it by name.
    module = types.ModuleType("made_for_the_cluster")
    exec("def triple(x):\n    return 3 * x\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        assert mt.map(module.triple, [1, 2], **on) == [3, 6]
    finally:
        del sys.modules[module.__name__]


def test_chunks_grow_from_measured_task_time(on: dict[str, Any], monkeypatch: Any) -> None:
    sizes: list[int] = []
    backend_class = _backend_class(on["backend"])
    submit = backend_class.submit

    def spy(self: Any, chunk: Any) -> None:
        sizes.append(len(chunk.indices))
        submit(self, chunk)

    monkeypatch.setattr(backend_class, "submit", spy)
    assert mt.map(faults.square, range(5000), **on) == [x * x for x in range(5000)]
    assert sizes[0] == 1 and max(sizes) >= 100, sizes
    assert len(sizes) < 200, f"{len(sizes)} chunks for 5000 tiny tasks"


@pytest.mark.parametrize("errors", ["raise", "return"])
def test_a_raising_task_is_its_own_failure(on: dict[str, Any], errors: str) -> None:
    if errors == "raise":
        with pytest.raises(mt.TaskError) as caught:
            mt.map(faults.fail_on, range(10), **on)
        error = caught.value
    else:
        results = mt.map(faults.fail_on, range(10), errors="return", **on)
        assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        error = results[3]
    assert isinstance(error, mt.TaskError) and (error.index, error.task) == (3, 3)
    assert isinstance(error.__cause__, ValueError) and "bad input 3" in str(error)
    assert "in fail_on" in str(error.__cause__.__cause__)  # the worker's traceback, as text


def test_retries_are_multitracks_own(on: dict[str, Any], tmp_path: Path) -> None:
    flaky = functools.partial(faults.flaky, counter_dir=str(tmp_path), fail_times=2)
    assert mt.map(flaky, range(4), retries=2, **on) == [0, 1, 2, 3]
    assert all((tmp_path / f"attempts-{x}").read_text() == "..." for x in range(4))
    with pytest.raises(mt.TaskError) as caught:
        mt.map(flaky, [7], retries=1, **on)
    assert caught.value.attempts == 2


def test_values_that_cannot_cross_fail_only_their_task(on: dict[str, Any]) -> None:
    results = mt.map(faults.lock_on, range(6), errors="return", **on)
    assert isinstance(results[3], mt.TaskError) and "could not be pickled" in str(results[3])
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
    args = [1, 2, faults.FailsToUnpickle(), 4]
    results = mt.map(faults.identity, args, errors="return", chunksize=4, **on)
    assert results[:2] == [1, 2] and results[3] == 4
    assert isinstance(results[2], mt.TaskError) and "refuses to be unpickled" in str(results[2])


def test_initializer_runs_on_the_workers(on: dict[str, Any]) -> None:
    got = mt.map(faults.read_state, range(6), initializer=faults.set_state, initargs=("ok",), **on)
    assert got == [("ok", i) for i in range(6)]
    with pytest.raises(mt.WorkerStartError, match="initializer exploded"):
        mt.map(faults.square, range(4), initializer=faults.failing_initializer, **on)


def test_pool_runs_several_calls(on: dict[str, Any]) -> None:
    with mt.Pool(**on) as pool:
        with pytest.raises(mt.TaskError):
            pool.map(faults.fail_on, range(10))
        assert pool.map(faults.square, range(5)) == [0, 1, 4, 9, 16]
        assert list(pool.imap(faults.square, range(3))) == [0, 1, 4]


def test_imap_is_lazy_and_stops_early(on: dict[str, Any]) -> None:
    results = []
    for value in mt.imap(faults.square, itertools.count(), **on):  # endless input
        results.append(value)
        if len(results) == 200:
            break  # the chunks still in flight are cancelled; no_leftovers checks the rest
    assert results == [x * x for x in range(200)]


def test_default_workers_on_an_attached_cluster_is_all_of_it(on: dict[str, Any]) -> None:
    options = {k: v for k, v in on.items() if k != "workers"}
    with mt.Pool(**options) as pool:
        assert pool.map(faults.square, range(3)) == [0, 1, 4]
        assert pool._backend is not None and pool._backend.slots == 2  # the cluster's CPUs


def test_a_function_that_cannot_be_sent_is_refused(on: dict[str, Any]) -> None:
    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot be sent"):
        mt.map(lambda x: (lock, x), range(3), **on)


def test_task_prints_reach_the_caller(on: dict[str, Any], capsys: Any) -> None:
    assert mt.map(faults.noisy, range(3), **on) == [0, 1, 2]
    out, err = capsys.readouterr()
    assert all(f"worker says {i}" in out for i in range(3)), out
    assert all(f"worker warns {i}" in err for i in range(3)), err


# -- the fault model ----------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 4])
def test_a_worker_killed_mid_task_is_that_items_crash(on: dict[str, Any], chunksize: int) -> None:
    results = mt.map(faults.sigkill_on, range(12), errors="return", chunksize=chunksize, **on)
    crashed = results[3]
    assert isinstance(crashed, mt.WorkerCrashed) and (crashed.index, crashed.task) == (3, 3)
    assert crashed.attempts == 1
    assert [r for i, r in enumerate(results) if i != 3] == [i for i in range(12) if i != 3]


def test_a_worker_killed_raises_in_raise_mode(on: dict[str, Any]) -> None:
    with pytest.raises(mt.WorkerCrashed) as caught:
        mt.map(faults.sigkill_on, range(8), **on)
    assert caught.value.index == 3


@pytest.mark.parametrize("errors", ["raise", "return"])
def test_timeout_stops_the_task(on: dict[str, Any], errors: str) -> None:
    """Ray kills the worker (``ray.cancel(force=True)``); dask cancels the task and restarts
    its worker through the nanny. Either way the caller gets ``TaskTimeout`` for that item."""
    hang = functools.partial(faults.sleep_on, seconds=60)
    started = time.monotonic()
    if errors == "raise":
        with pytest.raises(mt.TaskTimeout) as caught:
            mt.map(hang, range(6), timeout=1.0, **on)
        error = caught.value
    else:
        results = mt.map(hang, range(6), timeout=1.0, errors="return", **on)
        assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]
        error = results[3]
    assert isinstance(error, mt.TaskTimeout) and isinstance(error, TimeoutError)
    assert error.index == 3
    assert time.monotonic() - started < 20  # not the task's 60 s


def test_a_timeout_is_per_task_even_where_only_chunks_are_timed(
    on: dict[str, Any], tmp_path: Path
) -> None:
    """A cluster backend sees when a chunk started, not each task: with a timeout, every task
    travels alone, so three 0.4 s tasks asked to share a chunk are not one 1.2 s "task" that
    times out and runs again."""
    job = functools.partial(faults.sleep_and_log, log_dir=str(tmp_path))
    tasks = [(i, 0.4) for i in range(6)]
    assert mt.map(job, tasks, timeout=1.0, chunksize=3, **on) == list(range(6))
    runs = [index for index, _ in faults.logged_runs(tmp_path)]
    assert runs == list(range(6)), "a task ran twice: its chunk was timed as one task"


# -- clusters of multitrack's own -----------------------------------------------------------

_OWN_CLUSTER_SCRIPT = """
import json, sys, time
import psutil
sys.path.insert(0, {tests!r})
import faults, multitrack as mt

results = mt.map(faults.square, range(50), backend={engine!r}, workers=2)
deadline = time.monotonic() + 10
while psutil.Process().children(recursive=True) and time.monotonic() < deadline:
    time.sleep(0.1)
left = [p.cmdline() for p in psutil.Process().children(recursive=True)]
print(json.dumps({{"results": results, "left": left}}))
"""


@pytest.mark.ray
@pytest.mark.timeout(90)
def test_ray_starts_and_stops_a_cluster_of_its_own(tmp_path: Path) -> None:
    """In a fresh interpreter: this one is attached to the session's Ray (one per process).
    No ``if __name__ == "__main__"`` guard, no leftover process."""
    pytest.importorskip("ray")
    script = tmp_path / "own.py"
    script.write_text(_OWN_CLUSTER_SCRIPT.format(tests=str(Path(__file__).parent), engine="ray"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=80, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"results": [x * x for x in range(50)], "left": []}


@pytest.mark.dask
def test_dask_starts_and_stops_a_cluster_of_its_own() -> None:
    pytest.importorskip("distributed")
    from distributed import Client

    with pytest.raises(ValueError, match="No clients found"):
        Client.current()  # the session client is not the default: nothing to attach to
    assert mt.map(faults.square, range(50), backend="dask", workers=2) == [x * x for x in range(50)]
    # no_leftovers checks its worker processes and threads are gone


@pytest.mark.dask
def test_dask_cluster_without_workers_fails_instead_of_hanging(monkeypatch: Any) -> None:
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    from multitrack.backends import _dask

    monkeypatch.setattr(_dask, "NO_WORKER_GRACE", 1.0)
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        started = time.monotonic()
        with pytest.raises(mt.WorkerStartError, match="no worker"):
            mt.map(faults.square, range(3), backend="dask", client=client)
        assert time.monotonic() - started < 10


@pytest.mark.dask
def test_dask_timeout_on_a_worker_without_nanny_fails_instead_of_hanging() -> None:
    """Nothing can stop the task there: its thread stays held, and when no thread is left the
    call fails rather than wait for it."""
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    hang = functools.partial(faults.sleep_on, bad=0, seconds=2)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        started = time.monotonic()
        with pytest.raises(mt.WorkerStartError, match="cannot stop"):
            mt.map(hang, range(3), backend="dask", client=client, timeout=0.5, errors="return")
        assert time.monotonic() - started < 5


# -- options and extras (no cluster) --------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"address": "tcp://x:8786"}, ValueError, "backend='dask' or 'ray'"),
        ({"backend": "ray", "client": object()}, TypeError, "distributed.Client"),
        ({"backend": "dask", "address": 7}, TypeError, "address"),
        ({"backend": "ray", "max_tasks_per_worker": 3}, ValueError, "max_tasks_per_worker"),
    ],
)
def test_cluster_options_are_checked(options: dict[str, Any], error: type, words: str) -> None:
    pytest.importorskip("ray" if options.get("backend") == "ray" else "distributed")
    with pytest.raises(error, match=words):
        mt.map(faults.square, range(3), **options)


@pytest.mark.parametrize(("engine_name", "module"), [("dask", "distributed"), ("ray", "ray")])
def test_a_missing_extra_says_how_to_install_it(
    engine_name: str, module: str, monkeypatch: Any
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else find_spec(name)
    )
    with pytest.raises(ImportError, match=rf'pip install "multitrack\[{engine_name}\]"'):
        mt.map(faults.square, range(3), backend=engine_name)


def _backend_class(engine: str) -> Any:
    if engine == "ray":
        from multitrack.backends._ray import RayBackend

        return RayBackend
    from multitrack.backends._dask import DaskBackend

    return DaskBackend
