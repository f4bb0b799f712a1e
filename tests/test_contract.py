"""The contract every backend keeps: same results as builtin ``map``, in order or not, with the
same options and the same failure policy. Each test runs on every backend."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import typing
from collections.abc import Iterator
from typing import Any

import pytest

import faults
import multitrack as mt
from multitrack import _api, _options
from scripts import run_script

BACKENDS = ["process", "thread", "serial"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize("chunksize", [None, 1, 7])
@pytest.mark.parametrize("ordered", [True, False])
def test_results_match_builtin_map(backend: str, ordered: bool, chunksize: int | None) -> None:
    inputs = list(range(257))
    got = mt.map(
        faults.square, inputs, backend=backend, workers=2, ordered=ordered, chunksize=chunksize
    )
    expected = [x * x for x in inputs]
    assert (got if ordered else sorted(got)) == expected


class _Backwards(list[int]):
    def __iter__(self) -> Iterator[int]:
        return reversed(self)


@pytest.mark.parametrize(
    "inputs",
    [list(range(300)), tuple(range(300)), _Backwards(range(300))],
    ids=["list", "tuple", "list-subclass-with-own-iter"],
)
def test_sequences_are_read_as_builtin_map_reads_them(inputs: Any) -> None:
    # Lists and tuples are sliced, not iterated; a subclass keeps its own __iter__.
    got = mt.map(faults.square, inputs, workers=2, progress=False)
    assert got == list(map(faults.square, inputs))


def test_several_iterables_zip_to_the_shortest(backend: str) -> None:
    got = mt.map(faults.add, range(10), iter(range(100, 105)), backend=backend, workers=2)
    assert got == list(map(faults.add, range(10), range(100, 105)))


def test_starmap(backend: str) -> None:
    pairs = [(i, i + 1) for i in range(20)]
    assert mt.starmap(faults.add, pairs, backend=backend, workers=2) == [
        2 * i + 1 for i in range(20)
    ]


@pytest.mark.parametrize(
    ("make", "expected"),
    [(list, []), (lambda: iter([]), []), (lambda: (x for x in [5]), [25]), (lambda: [7], [49])],
)
def test_empty_and_tiny_inputs(backend: str, make: Any, expected: list[int]) -> None:
    assert mt.map(faults.square, make(), backend=backend, workers=2) == expected


def test_any_iterable_and_any_value(backend: str) -> None:
    data = {"a": 1, "b": [2, 3], "c": None}
    got = mt.map(faults.identity, data.values(), backend=backend, workers=2)
    assert got == list(data.values())
    assert mt.map(faults.type_name, "xy", backend=backend, workers=2) == ["str", "str"]


def test_imap_is_lazy_and_can_stop_early(backend: str) -> None:
    results = []
    for value in mt.imap(faults.square, itertools.count(), backend=backend, workers=2):
        results.append(value)
        if len(results) == 50:
            break
    assert results == [x * x for x in range(50)]


def test_imap_unordered_gives_every_result_once(backend: str) -> None:
    got = list(mt.imap(faults.square, range(300), backend=backend, workers=2, ordered=False))
    assert sorted(got) == [x * x for x in range(300)]


def test_lambdas_and_closures(backend: str) -> None:
    offset = 10
    assert mt.map(lambda x: x + offset, range(5), backend=backend, workers=2) == list(range(10, 15))


def test_errors_raise_carries_index_task_and_cause(backend: str) -> None:
    with pytest.raises(mt.TaskError) as caught:
        mt.map(faults.fail_on, range(10), backend=backend, workers=2)
    error = caught.value
    assert error.index == 3 and error.task == 3 and error.attempts == 1
    assert isinstance(error.__cause__, ValueError)
    assert "bad input 3" in str(error)
    if backend == "process":  # the worker's traceback comes back as text
        assert "in fail_on" in str(error.__cause__.__cause__)


def test_errors_return_keeps_going(backend: str) -> None:
    got = mt.map(faults.fail_on, range(10), backend=backend, workers=2, errors="return")
    assert [g for i, g in enumerate(got) if i != 3] == [i for i in range(10) if i != 3]
    assert isinstance(got[3], mt.TaskError) and got[3].index == 3


@pytest.mark.parametrize("ordered", [True, False])
def test_failures_inside_big_chunks_keep_every_other_result(backend: str, ordered: bool) -> None:
    # Results travel and are stored per span of a chunk; failures split the span.
    got = mt.map(
        faults.fail_on_multiples,
        range(200),
        backend=backend,
        workers=2,
        chunksize=50,
        ordered=ordered,
        errors="return",
    )
    failed = [g for g in got if isinstance(g, mt.TaskError)]
    assert sorted(error.index for error in failed) == list(range(0, 200, 7))
    values = [g for g in got if not isinstance(g, mt.TaskError)]
    expected = [i for i in range(200) if i % 7]
    assert (values if ordered else sorted(values)) == expected
    if ordered:
        assert all(got[error.index] is error for error in failed)


@pytest.mark.timeout(20)
def test_a_long_chunk_reports_what_it_finished_before_it_ends(tmp_path: Any) -> None:
    # Task 1 waits until the caller has seen task 0's result, which must therefore come back
    # while its chunk still runs (else task 1 gives up after 10 s and returns -1).
    import functools

    release = tmp_path / "release"
    job = functools.partial(faults.wait_for_file, path=str(release))
    results = mt.imap(job, range(3), workers=1, chunksize=3)
    assert next(results) == 0
    release.touch()
    assert list(results) == [1, 2]


def test_task_of_several_arguments_is_their_tuple(backend: str) -> None:
    def divide(a: int, b: int) -> float:
        return a / b

    got = mt.map(divide, [1, 2], [1, 0], backend=backend, workers=2, errors="return")
    assert got[0] == 1.0 and got[1].task == (2, 0)


def test_initializer_runs_in_each_worker(backend: str) -> None:
    got = mt.map(
        faults.read_state,
        range(6),
        backend=backend,
        workers=2,
        initializer=faults.set_state,
        initargs=("ready",),
    )
    assert got == [("ready", i) for i in range(6)]


def test_initializer_failure_is_a_start_error(backend: str) -> None:
    with pytest.raises(mt.WorkerStartError, match="initializer"):
        mt.map(
            faults.square,
            range(4),
            backend=backend,
            workers=2,
            initializer=faults.failing_initializer,
        )


def test_pool_reuses_workers_across_calls(backend: str) -> None:
    with mt.Pool(workers=2, backend=backend) as pool:
        first = set(pool.map(faults.pid_of, range(40)))
        assert pool.map(faults.square, range(5)) == [0, 1, 4, 9, 16]
        second = set(pool.map(faults.pid_of, range(40)))
        assert pool.starmap(faults.add, [(1, 2)]) == [3]
        assert list(pool.imap(faults.square, range(3))) == [0, 1, 4]
    if backend == "process":  # the same (at most two) workers served every call
        assert len(first | second) <= 2


def test_pool_survives_a_failed_call(backend: str) -> None:
    with mt.Pool(workers=2, backend=backend) as pool:
        with pytest.raises(mt.TaskError):
            pool.map(faults.fail_on, range(10))
        assert pool.map(faults.square, range(4)) == [0, 1, 4, 9]


def test_pool_rejects_worker_options_per_call() -> None:
    with mt.Pool(workers=1, backend="serial") as pool, pytest.raises(TypeError, match="workers"):
        pool.map(faults.square, [1], workers=2)  # type: ignore[call-arg]


@pytest.mark.parametrize("backend", ["process", "serial"])  # threads print straight through
def test_worker_output_reaches_the_caller(backend: str, capfd: pytest.CaptureFixture[str]) -> None:
    assert mt.map(faults.noisy, range(3), backend=backend, workers=2) == [0, 1, 2]
    out, err = capfd.readouterr()
    for i in range(3):
        assert f"worker says {i}\n" in out
        assert f"worker warns {i}\n" in err


def test_max_tasks_per_worker_replaces_workers() -> None:
    pids = mt.map(faults.pid_of, range(12), workers=2, max_tasks_per_worker=3)
    assert len(set(pids)) >= 4
    for pid in set(pids):
        assert pids.count(pid) <= 3


# -- options are checked before any worker starts ------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "names"),
    [
        ({"workers": 0}, ValueError, "workers"),
        ({"workers": "2"}, TypeError, "workers"),
        ({"backend": "gpu"}, ValueError, "backend"),
        ({"ordered": "yes"}, TypeError, "ordered"),
        ({"chunksize": 0}, ValueError, "chunksize"),
        ({"chunksize": 2.5}, TypeError, "chunksize"),
        ({"progress": "loud"}, ValueError, "progress"),
        ({"desc": 3}, TypeError, "desc"),
        ({"errors": "ignore"}, ValueError, "errors"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"retries": -1}, ValueError, "retries"),
        ({"initializer": 3}, TypeError, "initializer"),
        ({"initargs": "ab"}, TypeError, "initargs"),
        ({"max_tasks_per_worker": 0}, ValueError, "max_tasks_per_worker"),
        ({"timeout": 1, "backend": "serial"}, ValueError, "timeout"),
    ],
)
def test_bad_options_name_the_argument(options: dict[str, Any], error: type, names: str) -> None:
    with pytest.raises(error, match=names):
        mt.map(faults.square, [1], **options)


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="colour"):
        mt.map(faults.square, [1], colour="red")  # type: ignore[call-arg]


def test_an_unknown_option_close_to_a_real_one_suggests_it() -> None:
    with pytest.raises(TypeError, match=r"'worker' \(did you mean 'workers'\?\)"):
        mt.map(faults.square, [1], worker=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"did you mean 'retries'"):
        mt.Pool(retry=2)  # type: ignore[call-arg]


REFUSED_BY_BACKEND = [
    pytest.param({"backend": "serial", "timeout": 0.1}, "timeout", id="serial-timeout"),
    pytest.param(
        {"backend": "serial", "max_tasks_per_worker": 2}, "max_tasks_per_worker", id="serial-mtpw"
    ),
    pytest.param({"address": "10.0.0.1:1"}, "address", id="process-address"),
]


@pytest.mark.parametrize(("options", "name"), REFUSED_BY_BACKEND)
def test_an_option_the_backend_cannot_honour_is_refused_on_every_path(
    options: dict[str, Any], name: str
) -> None:
    # Once an option was checked in map() only: Pool(backend="serial", timeout=0.1) ran
    # its tasks to the end, the timeout silently ignored.
    with pytest.raises(ValueError, match=name):
        mt.map(faults.sleep_for, [0.01], **options)
    with pytest.raises(ValueError, match=name):
        mt.Pool(**options)
    per_call = {k: v for k, v in options.items() if k not in _options.POOL_ONLY}
    if per_call:
        pool_options = {k: v for k, v in options.items() if k in _options.POOL_ONLY}
        with mt.Pool(**pool_options) as pool, pytest.raises(ValueError, match=name):
            pool.map(faults.sleep_for, [0.5], **per_call)


def test_integers_are_what_operator_index_accepts() -> None:
    np = pytest.importorskip("numpy")
    results = mt.map(
        faults.square, [1, 2, 3], workers=np.int64(2), chunksize=np.int32(2), retries=np.int8(1)
    )
    assert results == [1, 4, 9]
    assert mt.map(faults.square, [3], timeout=np.float32(5.0)) == [9]
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="workers"):
            mt.map(faults.square, [1], workers=bad)


def test_the_options_are_listed_once() -> None:
    # The table, the checked record and the public signatures' TypedDicts name the same.
    table = set(_options.OPTIONS)
    record = {f.name for f in dataclasses.fields(_options.Options)} - {"fit_cluster"}
    signature = set(typing.get_type_hints(_api.MapOptions))
    assert table == record == signature
    assert set(typing.get_type_hints(_api.PoolOptions)) == table - {"workers"}
    assert set(typing.get_type_hints(_api.CallOptions)) == table - set(_options.POOL_ONLY)


def test_a_starmap_item_that_is_not_a_tuple_fails_only_its_task() -> None:
    results = mt.starmap(faults.add, [(1, 2), 3, (4, 5)], errors="return")
    assert results[0] == 3 and results[2] == 9
    error = results[1]
    assert isinstance(error, mt.TaskError) and error.index == 1 and error.task == 3
    assert isinstance(error.__cause__, TypeError)
    with pytest.raises(mt.TaskError) as caught:
        mt.starmap(faults.add, [(1, 2), 3])
    assert caught.value.index == 1


def test_bad_inputs_are_refused_up_front() -> None:
    with pytest.raises(TypeError, match="callable"):
        mt.map(3, [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="iterable #2 is not iterable"):
        mt.map(faults.add, [1], 5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at least one iterable"):
        mt.map(faults.square)


def test_function_that_cannot_be_sent_is_refused_before_work() -> None:
    import threading

    lock = threading.Lock()
    with pytest.raises(TypeError, match="cannot be sent to worker processes"):
        mt.map(lambda x: (lock, x), [1, 2])


# -- the caller's script: no __main__ guard needed, its functions and classes just work -----


@pytest.mark.usefixtures("each_start_method")
def test_functions_and_classes_of_a_script_work_without_a_main_guard(tmp_path: Any) -> None:
    output = _run_script(
        tmp_path,
        """
            import dataclasses
            import multitrack as mt

            SCALE = 3

            @dataclasses.dataclass
            class Job:
                n: int

            def work(job):
                return Job(job.n * SCALE)

            results = mt.map(work, [Job(i) for i in range(5)], workers=2)
            assert all(isinstance(r, Job) for r in results), results
            print([r.n for r in results])
            """,
    )
    assert output == ["[0, 3, 6, 9, 12]"]


@pytest.mark.usefixtures("each_start_method")
def test_a_task_can_pickle_the_scripts_classes_and_functions_by_name(tmp_path: Any) -> None:
    # Inside a task, the script's names are found under __main__ as in a fork of the script:
    # a task caching an instance of a script's class with pickle, and a multiprocessing pool
    # in a task mapping a script's function (both pickle them by name).
    output = _run_script(
        tmp_path,
        """
            import dataclasses
            import multiprocessing
            import pickle
            import multitrack as mt

            @dataclasses.dataclass
            class Job:
                n: int

            def double(n):
                return 2 * n

            def cache(job):
                again = pickle.loads(pickle.dumps(job))
                return type(again) is type(job) and again == job

            def nested(job):
                with multiprocessing.get_context("fork").Pool(1) as pool:
                    return pool.map(double, [job.n])

            def chained(job):
                return pickle.loads(pickle.dumps(double))(job.n)

            print(mt.map(cache, [Job(1), Job(2)], workers=2))
            print(mt.map(nested, [Job(3)], workers=1))
            print(mt.starmap(chained, [(Job(4),)], workers=1))
            """,
    )
    assert output == ["[True, True]", "[[6]]", "[8]"]


@pytest.mark.usefixtures("each_start_method")
def test_an_imap_left_open_at_exit_ends_quietly(tmp_path: Any) -> None:
    # Its run is closed while the interpreter shuts down, when imports fail: nothing of
    # that may reach the user (the zygote's close imported subprocess then).
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import time
            import multitrack as mt

            def slow(x):
                time.sleep(0.05)
                return x

            results = mt.imap(slow, range(1000), workers=2, progress=False)
            print(next(results))
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "0\n", "")


@pytest.mark.timeout(60)
def test_slow_tail_is_shared_and_every_task_runs_exactly_once(tmp_path: Any) -> None:
    # Many quick tasks make chunks big; slow ones at the end then land in one chunk. An idle
    # worker asks for the unstarted part back, so the tail is shared: every task must still
    # run exactly once, and results stay in order.
    import functools

    tasks = [(i, 0.001) for i in range(300)] + [(300 + i, 0.15) for i in range(6)]
    job = functools.partial(faults.sleep_and_log, log_dir=str(tmp_path))
    assert mt.map(job, tasks, workers=2) == list(range(306))
    runs = faults.logged_runs(tmp_path)
    assert [index for index, _ in runs] == list(range(306))
    slow_pids = {pid for index, pid in runs if index >= 300}
    assert len(slow_pids) == 2, "both workers should have run some of the slow tail"


@pytest.mark.timeout(60)
def test_a_reused_pool_shares_the_slow_tail_of_every_call(tmp_path: Any) -> None:
    # A fixed chunksize gives every call the same chunk ids, so a give-back remembered from
    # one call (by chunk id) would stop the next call's tail from being asked back: its six
    # slow tasks would then all run on one worker.
    import functools

    tasks = [(i, 0.001) for i in range(24)] + [(24 + i, 0.1) for i in range(6)]
    with mt.Pool(workers=2, chunksize=6, progress=False) as pool:
        for call in range(3):
            log_dir = tmp_path / str(call)
            log_dir.mkdir()
            job = functools.partial(faults.sleep_and_log, log_dir=str(log_dir))
            assert pool.map(job, tasks) == list(range(30))
            slow_pids = {pid for index, pid in faults.logged_runs(log_dir) if index >= 24}
            assert len(slow_pids) == 2, f"call {call}: the slow tail ran on one worker"


@pytest.mark.usefixtures("each_start_method")
def test_a_scripts_function_sees_globals_set_by_its_initializer(tmp_path: Any) -> None:
    # The classic trap with functions sent by value: the initializer and the function must
    # share one globals dict in the worker.
    output = _run_script(
        tmp_path,
        """
            import multitrack as mt

            MODEL = None

            def load(name):
                global MODEL
                MODEL = name.upper()

            def predict(x):
                return f"{MODEL}:{x}"

            print(mt.map(predict, [1, 2], workers=2, initializer=load, initargs=("net",)))
            """,
    )
    assert output == ["['NET:1', 'NET:2']"]


def _run_script(tmp_path: Any, source: str) -> list[str]:
    """Run ``source`` as a script (its own ``__main__``) and return its output lines."""
    return run_script(tmp_path, source).splitlines()


def test_later_pool_calls_see_globals_set_by_the_initializer(tmp_path: Any) -> None:
    # A Pool starts its workers once: later calls ship their function alone, in a pickle of
    # its own. It must still see what the initializer set, and so must a helper it calls.
    lines = _run_script(
        tmp_path,
        """
        import multitrack as mt

        MODEL = None

        def load(name):
            global MODEL
            MODEL = name.upper()

        def predict(x):
            return f"{MODEL}:{x}"

        def label(x):
            return f"{MODEL}-{x}"

        def describe(x):
            return label(x) + "!"

        with mt.Pool(workers=2, initializer=load, initargs=("net",)) as pool:
            print(pool.map(predict, [1, 2, 3]))
            print(pool.map(describe, [1, 2, 3]))
        """,
    )
    assert lines == ["['NET:1', 'NET:2', 'NET:3']", "['NET-1!', 'NET-2!', 'NET-3!']"]


@pytest.mark.usefixtures("each_start_method")
def test_a_constant_changed_between_pool_calls_reaches_the_workers(tmp_path: Any) -> None:
    # The initializer's globals are kept, but every other global takes the caller's value
    # of the moment: SCALE changes between the calls, MODEL stays what the initializer set.
    lines = _run_script(
        tmp_path,
        """
        import multitrack as mt

        MODEL = None
        SCALE = 1

        def load():
            global MODEL
            MODEL = "net"

        def predict(x):
            return f"{MODEL}:{x * SCALE}"

        with mt.Pool(workers=2, initializer=load) as pool:
            print(pool.map(predict, [1, 2]))
            SCALE = 10
            print(pool.map(predict, [1, 2]))
        """,
    )
    assert lines == ["['net:1', 'net:2']", "['net:10', 'net:20']"]


def test_a_stopped_map_hands_what_it_finished_to_the_exception() -> None:
    with pytest.raises(mt.TaskError) as caught:
        mt.map(functools.partial(faults.fail_on, bad=5), range(10), workers=1, chunksize=1)
    finished = caught.value.results
    assert isinstance(finished, dict) and 5 not in finished
    assert set(range(5)) <= set(finished) and all(finished[i] == i for i in finished)
    # Ctrl-C (with the serial backend a task's KeyboardInterrupt is the caller's own)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        mt.map(faults.interrupt_on, range(6), backend="serial", chunksize=1)
    assert interrupted.value.results == {0: 0, 1: 1, 2: 2}  # type: ignore[attr-defined]
    with pytest.raises(mt.TaskError) as caught:
        mt.map(faults.fail_on, range(10), workers=1, chunksize=1, ordered=False)
    assert sorted(caught.value.results) == [0, 1, 2]  # type: ignore[arg-type]
