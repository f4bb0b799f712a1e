"""How workers start (``backends/_start.py``, ``backends/_zygote.py``): by default what a fresh
interpreter would see, whatever threads the caller runs; ``start_method="fork"`` on request;
the same worker, the same behaviour, either way."""

from __future__ import annotations

import gc
import importlib.util
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest

import faults
import multitrack as mt
from multitrack.backends import _platform, _start, _zygote
from multitrack.backends._importable import modules_needed, not_importable
from scripts import run_script


def latest_zygote() -> _zygote.Zygote:
    """The zygote the last call used (the registry keeps the most recently used last)."""
    return list(_zygote._zygotes.values())[-1]


needs_fork = pytest.mark.skipif(
    not _platform.CAN_FORK, reason="fork is not used here (MULTITRACK_WITHOUT or not Linux)"
)

# A module no worker imports on its own: a worker has it only when it inherited the caller's.
MARKER = "colorsys"

# Issue 13's example: a module global the caller sets at run time.
HELPER = """
SCALE = 1

def setup(scale):
    global SCALE
    SCALE = scale

def work(x):
    return x * SCALE
"""
MAIN = """
import sys
if sys.argv[1:] == ["numpy"]:
    import numpy  # starts OpenBLAS's threads in the caller
import multitrack as mt, helper
helper.setup(10)
try:
    forked = mt.map(helper.work, [1, 2, 3], workers=2, start_method="fork")
except mt.WorkerStartError:  # where fork is unsafe (macOS) or switched off
    forked = "refused"
print(mt.map(helper.work, [1, 2, 3], workers=2), forked)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("threads", ["numpy", "no-threads"])
def test_what_a_worker_sees_does_not_depend_on_the_callers_threads(
    tmp_path: Path, threads: str
) -> None:
    if threads == "numpy":
        pytest.importorskip("numpy")
    (tmp_path / "helper.py").write_text(HELPER)
    (tmp_path / "main.py").write_text(MAIN)
    env = {**os.environ, "MULTITRACK_PROGRESS": "0"}
    env.pop(_start.START_METHOD_ENV, None)
    env.pop("OPENBLAS_NUM_THREADS", None)
    done = subprocess.run(
        [sys.executable, "main.py", threads],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stderr
    # spawn (the default): the module as imported; fork: the caller's value of the moment
    forked = "[10, 20, 30]" if _platform.CAN_FORK else "refused"
    assert done.stdout == f"[1, 2, 3] {forked}\n", done.stdout


def test_workers_do_not_inherit_the_callers_imports() -> None:
    __import__(MARKER)
    assert _start.start_method() == "spawn"
    assert mt.map(faults.imported, [MARKER] * 4, workers=2) == [False] * 4


@needs_fork
def test_forked_workers_inherit_the_callers_imports_and_globals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    __import__(MARKER)
    monkeypatch.setattr(faults, "SCALE", 10)
    assert mt.map(faults.imported, [MARKER] * 4, workers=2, start_method="fork") == [True] * 4
    monkeypatch.setenv(_start.START_METHOD_ENV, "fork")  # the same, for a whole script
    assert mt.map(faults.scaled, [1, 2], workers=2) == [10, 20]
    monkeypatch.delenv(_start.START_METHOD_ENV)
    assert mt.map(faults.scaled, [1, 2], workers=2) == [1, 2]


@needs_fork
def test_fork_is_refused_while_another_python_thread_runs() -> None:
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name="busy-helper")
    other.start()
    try:
        with pytest.raises(mt.WorkerStartError, match=r"busy-helper.*start_method='spawn'"):
            mt.map(abs, [-1], workers=1, start_method="fork")
        # the default does not care: what workers see is the same with the thread
        assert mt.map(faults.imported, [MARKER], workers=1) == [False]
    finally:
        stop.set()
        other.join()


def test_an_unknown_start_method_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="start_method='forkserver' is not one of"):
        mt.map(abs, [1, 2], workers=2, start_method="forkserver")
    with pytest.raises(ValueError, match="start_method= is how worker processes start"):
        mt.map(abs, [1, 2], backend="thread", start_method="fork")
    monkeypatch.setenv(_start.START_METHOD_ENV, "forkserver")
    with pytest.raises(ValueError, match="MULTITRACK_START_METHOD='forkserver'"):
        mt.map(abs, [1, 2], workers=2)


IMPORT_COUNTER = """
import os
with open(os.environ["IMPORT_LOG"], "a") as log:
    log.write(f"{os.getpid()}\\n")

def crash_on(x, bad):
    if x == bad:
        os._exit(3)
    return x
"""


@needs_fork
@pytest.mark.timeout(60)
def test_the_functions_module_is_imported_once_for_every_later_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Calls, replacements after a crash and max_tasks_per_worker restarts are forks of the
    # zygote, which imported the function's module once (cv2, torch: seconds each).
    log = tmp_path / "imports.log"
    (tmp_path / "counted.py").write_text(IMPORT_COUNTER)
    monkeypatch.setenv("IMPORT_LOG", str(log))
    monkeypatch.syspath_prepend(str(tmp_path))
    import counted  # type: ignore[import-not-found]

    try:
        log.write_text("")
        for _ in range(3):
            assert mt.map(counted.crash_on, range(6), [-1] * 6, workers=2) == list(range(6))
        got = mt.map(counted.crash_on, range(6), [2] * 6, workers=2, errors="return")
        assert isinstance(got[2], mt.WorkerCrashed)
        mt.map(counted.crash_on, range(6), [-1] * 6, workers=2, max_tasks_per_worker=1)
        assert len(log.read_text().split()) == 1, log.read_text()
    finally:
        sys.modules.pop("counted", None)


@needs_fork
def test_workers_see_the_callers_environment_directory_and_path_of_the_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert mt.map(abs, [-1], workers=1) == [1]  # a zygote is up
    monkeypatch.setenv("MULTITRACK_TEST_FLAG", "set later")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latecomer.py").write_text("def where(_):\n    import os\n    return os.getcwd()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import latecomer  # type: ignore[import-not-found]

    try:
        assert mt.map(faults.environment, ["MULTITRACK_TEST_FLAG"], workers=1) == ["set later"]
        assert mt.map(latecomer.where, [0], workers=1) == [str(tmp_path)]
    finally:
        sys.modules.pop("latecomer", None)


@needs_fork
@pytest.mark.timeout(60)
def test_a_zygote_that_died_is_replaced() -> None:
    assert mt.map(abs, [-1, -2], workers=2) == [1, 2]
    zygote = latest_zygote()
    zygote.process.kill()
    zygote.process.wait()
    assert mt.map(abs, [-1, -2], workers=2) == [1, 2]
    # a new zygote forked those workers (not fresh interpreters, which would pass too)
    assert latest_zygote() is not zygote and latest_zygote().usable
    with mt.Pool(workers=2) as pool:  # and killed under a live pool: its workers live on
        assert pool.map(abs, [-1, -2]) == [1, 2]
        zygote = latest_zygote()
        zygote.process.kill()
        zygote.process.wait()
        assert pool.map(abs, [-3, -4]) == [3, 4]
        got = pool.map(faults.sigkill_on, range(5), errors="return")
        assert isinstance(got[3], mt.WorkerCrashed) and got[:3] == [0, 1, 2]


PRESTART = """
import os
import multitrack as mt
from multitrack.backends import _zygote

def zygotes():
    return [z.process.pid for z in _zygote._zygotes.values()]

imported = zygotes()
call = mt.map  # the first use of a call: its zygote boots while the caller goes on
reached = zygotes()
assert mt.map(abs, [-1, -2]) == [1, 2]  # default workers: forked from that very zygote
print(imported, reached == zygotes(), len(reached))
"""


@needs_fork
@pytest.mark.timeout(60)
def test_the_first_use_of_a_call_starts_its_zygote_and_an_import_does_not(
    tmp_path: Path,
) -> None:
    assert run_script(tmp_path, PRESTART).split() == ["[]", "True", "1"]
    # Asked for forks of the caller, nothing is started ahead.
    forked = PRESTART.replace(
        "import os\n", "import os\nos.environ['MULTITRACK_START_METHOD'] = 'fork'\n"
    )
    assert run_script(tmp_path, forked).split() == ["[]", "True", "0"]
    # A call that turns out to need no zygote closes the one started ahead of it.
    threads = PRESTART.replace("mt.map(abs, [-1, -2])", "mt.map(abs, [-1, -2], backend='thread')")
    threads = threads.replace("reached == zygotes()", "zygotes() == []")
    assert run_script(tmp_path, threads).split() == ["[]", "True", "1"]


ADOPTED = """
import os
import sys
sys.path.insert(0, {tests!r})
import faults
import multitrack as mt
from multitrack.backends import _zygote

call = mt.map  # the zygote started ahead: the default pool size's thread caps
ahead = [z.process.pid for z in _zygote._zygotes.values()]
os.environ[{variable!r}] = "set later"
got = call(faults.environment, ["OMP_NUM_THREADS", {variable!r}], workers=1)
now = [z.process.pid for z in _zygote._zygotes.values() if z.usable]
print(got == [str(os.cpu_count()), "set later"], now == ahead, len(now))
"""


@needs_fork
@pytest.mark.timeout(60)
def test_a_first_call_of_another_pool_size_uses_the_zygote_started_ahead(
    tmp_path: Path,
) -> None:
    # One worker may use every core: other thread caps than the zygote started ahead of the
    # call had. Blank, it takes the call's environment instead of a second zygote booting.
    tests = str(Path(__file__).parent)
    adopted = ADOPTED.format(tests=tests, variable="ZYGOTE_TEST_FLAG")
    assert run_script(tmp_path, adopted).split() == ["True", "True", "1"]
    # A variable that an interpreter reads as it starts cannot be taken later: a new one
    # (and the one started ahead stays, for a later call of the default size).
    started_anew = ADOPTED.format(tests=tests, variable="LC_ZYGOTE_TEST")
    assert run_script(tmp_path, started_anew).split() == ["True", "False", "2"]


THREADED = """
import os, threading, time
if os.getpid() != int(os.environ["CALLER_PID"]):  # not in the test's own process
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()

def double(x):
    return 2 * x
"""


@needs_fork
@pytest.mark.timeout(60)
def test_a_module_that_starts_a_thread_on_import_is_never_forked_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Preloaded in the zygote, it would make forking the zygote copy a thread's locks: the
    # zygote refuses, and workers are fresh interpreters (the same semantics), from then on.
    (tmp_path / "threaded.py").write_text(THREADED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CALLER_PID", str(os.getpid()))  # and a zygote of its own
    import threaded  # type: ignore[import-not-found]

    try:
        for _ in range(2):
            assert mt.map(threaded.double, [1, 2, 3], workers=2) == [2, 4, 6]
            zygote = latest_zygote()
            assert zygote.unsafe and not zygote.usable
    finally:
        sys.modules.pop("threaded", None)


def test_the_modules_a_function_needs_are_read_from_its_pickle() -> None:
    import json
    import pickle

    from multitrack.backends import _wire

    assert modules_needed(pickle.dumps(json.dumps)) == ["json"]

    def by_value(x: object) -> str:  # a local function: cloudpickle carries it by value
        return json.dumps(x)

    assert "json" in modules_needed(_wire.dumps(by_value))
    assert modules_needed(b"not a pickle") == []
    # A global ahead of a large buffer is found (the scan stops at the buffer).
    assert modules_needed(pickle.dumps((json.dumps, b"x" * (5 << 20)))) == ["json"]


ARGUMENTS_MODULE = """
import sys
sys.path.insert(0, {tests!r})
import faults
import multitrack as mt
import payload_module

from multitrack.backends import _zygote

def preloaded():
    return any("payload_module" in z._preloaded for z in _zygote._zygotes.values())

# The function names no module of the arguments': only unpickling them imports it.
print(mt.map(faults.type_name, [payload_module.Payload()], workers=1))
print(preloaded())  # not during that call: its workers were running
print(mt.map(faults.imported, ["payload_module"], workers=1))  # a worker of the next call
print(preloaded())
"""


@needs_fork
@pytest.mark.timeout(60)
def test_the_modules_of_a_calls_arguments_are_imported_once_for_later_calls(
    tmp_path: Path,
) -> None:
    # The zygote imports them before the next call's workers start, so that they do not
    # each import them again (torch: 1.7 s a worker, every call).
    (tmp_path / "payload_module.py").write_text("class Payload:\n    pass\n")
    script = ARGUMENTS_MODULE.format(tests=str(Path(__file__).parent))
    assert run_script(tmp_path, script).split() == ["['Payload']", "False", "[True]", "True"]


@pytest.mark.usefixtures("each_start_method")
def test_native_thread_caps_reach_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")  # the user's own setting wins
    per_worker = str(max(1, (os.cpu_count() or 1) // 2))
    got = mt.map(faults.environment, ["OMP_NUM_THREADS", "MKL_NUM_THREADS"], workers=2)
    assert got == [per_worker, "3"]


@pytest.mark.usefixtures("each_start_method")
def test_forked_workers_do_not_share_numpy_random_state() -> None:
    np = pytest.importorskip("numpy")
    np.random.random()  # the caller's global generator exists before the workers start
    draws = mt.map(faults.pid_and_draw, range(40), workers=2, chunksize=1)
    by_pid: dict[int, set[float]] = {}
    for pid, value in draws:
        by_pid.setdefault(pid, set()).add(value)
    assert len(by_pid) == 2, "both workers should have run tasks"
    first, second = by_pid.values()
    assert not first & second, "two workers drew the same numbers"
    assert float(np.random.random()) not in first | second  # nor the caller's next ones


@pytest.mark.usefixtures("each_start_method")
def test_the_callers_signal_handlers_stay_in_the_caller() -> None:
    # A forked worker starts with the caller's Python handlers; a SIGTERM must kill it as it
    # kills a fresh interpreter, not run the caller's handler there.
    import signal

    ran: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda *_: ran.append(1))
    try:
        [outcome] = mt.map(faults.sigterm_self, [0], workers=1, errors="return")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert isinstance(outcome, mt.WorkerCrashed)
    assert outcome.signal == "SIGTERM"
    assert not ran


@pytest.mark.usefixtures("each_start_method")
def test_output_buffered_before_the_fork_is_printed_once(tmp_path: Path) -> None:
    # Without a flush before fork(), a worker's first print would carry the caller's
    # unflushed text along, and it would appear twice.
    stdout = run_script(
        tmp_path,
        """
        import sys, multitrack as mt

        def shout(x):
            print("worker", x)
            return x

        sys.stdout.write("caller-before ")
        print(mt.map(shout, [1, 2], workers=2, chunksize=1))
        """,
        without_env=["PYTHONUNBUFFERED"],
    )
    assert stdout.count("caller-before") == 1, stdout
    assert stdout.count("worker 1") == stdout.count("worker 2") == 1, stdout


@needs_fork
def test_a_forked_worker_never_finalizes_the_callers_garbage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Garbage the caller had not collected yet is copied into a forked worker; collecting it
    # there would run its finalizer a second time, in the wrong process.
    marker = tmp_path / "finalized-by"

    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            marker.write_text(str(os.getpid()))

    monkeypatch.setenv(_start.START_METHOD_ENV, "fork")
    gc.disable()
    try:
        Cycle()
        mt.map(faults.collect_garbage, range(4), workers=2, chunksize=1)
        assert not marker.exists(), f"finalized in pid {marker.read_text()}"
    finally:
        gc.enable()
        gc.collect()
    assert marker.read_text() == str(os.getpid())


@pytest.mark.parametrize("kind", ["forked", "popen"])
def test_waiting_for_an_exit_is_bounded_either_way(kind: str) -> None:
    import signal
    import subprocess
    import sys
    import time

    with open(os.devnull, "rb") as sink:
        if kind == "forked":
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                time.sleep(30)
                os._exit(0)
            process: _start.WorkerProcess = _start.ForkedProcess(pid, sink, sink)
        else:
            process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert not _start.exited_within(process, 0.05)
        finally:
            os.kill(process.pid, signal.SIGKILL)
        assert _start.exited_within(process, 10.0)
        assert process.returncode == -signal.SIGKILL


def test_a_fresh_workers_sys_path_is_the_callers_in_the_callers_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_start.START_METHOD_ENV, "spawn")
    [seen] = mt.map(faults.sys_path, [0], workers=1)
    assert seen[: len(sys.path)] == sys.path


SHADOWED = """
import shutil, sys
from pathlib import Path
import multitrack
# A normal install: multitrack in a folder after the standard library, beside a package
# that shadows standard modules (PyPI's `typing` backport does, and kills every worker whose
# sys.path puts that folder first).
site = Path({site!r})
shutil.copytree(Path(multitrack.__file__).parent, site / "multitrack")
for name in ("typing", "queue"):
    (site / f"{{name}}.py").write_text("raise ImportError('the standard library was shadowed')")
for name in [m for m in sys.modules if m == "multitrack" or m.startswith("multitrack.")]:
    del sys.modules[name]
first_site = next(i for i, p in enumerate(sys.path) if "-packages" in p or p.endswith("src"))
sys.path.insert(first_site, str(site))
import multitrack as mt
assert mt.__file__.startswith(str(site)), mt.__file__
print(mt.map(abs, [-1, -2], workers=2))
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start", ["zygote", "fresh interpreters"])
def test_a_package_that_shadows_the_standard_library_does_not_kill_fresh_workers(
    tmp_path: Path, start: str
) -> None:
    source = SHADOWED.format(site=str(tmp_path / "site"))
    without = "fork" if start == "fresh interpreters" else ""
    out = run_script(
        tmp_path, f"import os\nos.environ['{_platform.WITHOUT_ENV}'] = {without!r}\n" + source
    )
    assert out.strip() == "[1, 2]"


def test_an_unsupported_platform_is_refused_with_the_alternatives(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_platform.os, "name", "nt")
    with pytest.raises(RuntimeError, match=r"POSIX.*backend='thread'.*WSL"):
        mt.map(abs, [-1])
    assert mt.map(abs, [-1], backend="thread") == [1]


def test_features_switched_off_by_name_and_unknown_ones_refused(tmp_path: Path) -> None:
    probe = (
        "from multitrack.backends import _platform as p; "
        "print(p.HAS_PIDFD, p.HAS_MEMFD, p.CAN_FORK)"
    )
    env = {**os.environ, _platform.WITHOUT_ENV: "pidfd, fork"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.stdout.split()[0::2] == ["False", "False"]
    env[_platform.WITHOUT_ENV] = "pidfd,epoll"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "unknown feature(s) epoll" in done.stderr


@needs_fork
def test_a_forked_worker_shares_the_globals_of_the_callers_script(tmp_path: Path) -> None:
    # The function goes by name to a fork of the caller, so the table it names is the
    # caller's own (copy-on-write, at the same address), not a copy pickled with it.
    out = run_script(
        tmp_path,
        """
        import multitrack as mt

        TABLE = bytearray(10_000_000)

        def where(_):
            return id(TABLE)

        print(mt.map(where, [0], workers=1, start_method="fork") == [id(TABLE)],
              mt.map(where, [0], workers=1) == [id(TABLE)])
        """,
    )
    assert out.split() == ["True", "False"]


@pytest.mark.usefixtures("each_start_method")
def test_a_worker_sees_the_callers_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # As a fresh interpreter started by the caller would (multiprocessing's spawn does so):
    # a module may read its flags at import.
    monkeypatch.setattr(sys, "argv", ["job.py", "--scale", "10"])
    assert mt.map(faults.sys_argv, [0], workers=1) == [["job.py", "--scale", "10"]]


@pytest.mark.parametrize("start", ["spawn", pytest.param("fork", marks=needs_fork)])
def test_a_worker_runs_with_the_callers_interpreter_options(tmp_path: Path, start: str) -> None:
    # python -O job.py: its workers run optimized too, as multiprocessing's spawn passes it
    out = run_script(
        tmp_path,
        f"""
        import sys
        import multitrack as mt

        def options(_):
            return sys.flags.optimize, sys.flags.utf8_mode, sys.warnoptions

        print(mt.map(options, [0], workers=1, start_method={start!r}) == [options(0)],
              options(0))
        """,
        flags=["-O", "-X", "utf8", "-W", "ignore::ResourceWarning"],
    )
    assert out.split(" ", 1) == ["True", "(1, 1, ['ignore::ResourceWarning'])\n"]


@pytest.mark.timeout(60)
def test_calls_in_several_threads_share_the_zygote_safely() -> None:
    failures: list[BaseException] = []

    def calls(offset: int) -> None:
        try:
            for _ in range(5):
                got = mt.map(faults.square, range(offset, offset + 20), workers=2)
                assert got == [x * x for x in range(offset, offset + 20)]
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=calls, args=(100 * n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


FAKE_TORCH = """
class cuda:
    @staticmethod
    def is_initialized():
        return True  # as after a model was moved to the GPU
"""


@needs_fork
@pytest.mark.timeout(60)
def test_a_module_that_initialises_cuda_on_import_is_never_forked_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if "torch" in sys.modules:
        pytest.skip("a real torch is loaded here")
    (tmp_path / "torch.py").write_text(FAKE_TORCH)
    (tmp_path / "on_gpu.py").write_text("import torch\n\ndef double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("MULTITRACK_TEST_ENV", "a zygote of its own")
    import on_gpu  # type: ignore[import-not-found]

    try:
        assert mt.map(on_gpu.double, [1, 2, 3], workers=2) == [2, 4, 6]
        zygote = latest_zygote()
        assert zygote.unsafe and not zygote.usable
    finally:
        sys.modules.pop("on_gpu", None)
        sys.modules.pop("torch", None)


PLUGIN = """
class Box:
    def __init__(self, value):
        self.value = value

def boxed(x):
    return Box(3 * x)
"""


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("each_start_method")
@pytest.mark.parametrize("made", ["from a file path", "at run time"])
def test_a_function_whose_module_is_not_on_sys_path_reaches_every_worker(
    tmp_path: Path, made: str
) -> None:
    # A config file or a plugin loaded by path (mmengine's Config does this), or code made at
    # run time: a fork of the caller has the module, a fresh worker cannot import it by name.
    if made == "from a file path":
        (tmp_path / "plugin_by_path.py").write_text(PLUGIN)
        spec = importlib.util.spec_from_file_location(
            "plugin_by_path", tmp_path / "plugin_by_path.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module.__name__] = module
        spec.loader.exec_module(module)
    else:
        module = types.ModuleType("plugin_made_now")
        sys.modules[module.__name__] = module
        exec(PLUGIN, module.__dict__)
    try:
        got = mt.map(module.boxed, [1, 2], workers=2)
        assert [box.value for box in got] == [3, 6]
        assert all(type(box) is module.Box for box in got)  # the caller's own class again
    finally:
        sys.modules.pop(module.__name__, None)


def test_the_import_system_is_asked_which_modules_a_worker_can_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "on_path_mod.py").write_text("X = 1\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "on_path_mod.py").write_text("X = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import on_path_mod  # type: ignore[import-not-found]

    try:
        assert not_importable(["json", "on_path_mod", "os.path"]) == []
        # the same name from another file: a worker would import the other one
        spec = importlib.util.spec_from_file_location(
            "on_path_mod", tmp_path / "other" / "on_path_mod.py"
        )
        assert spec is not None and spec.loader is not None
        shadow = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "on_path_mod", shadow)
        assert not_importable(["on_path_mod"]) == ["on_path_mod"]
    finally:
        sys.modules.pop("on_path_mod", None)
        del on_path_mod


@pytest.mark.timeout(30)
def test_calls_in_two_threads_take_turns_with_cloudpickles_registry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A function of a module workers cannot import is pickled with its module registered by
    # value in cloudpickle's global registry: a second thread seeing it registered and
    # pickling while the first unregisters it would send the function by name.
    import cloudpickle

    from multitrack.backends import _wire

    module = types.ModuleType("made_for_two_threads")
    exec("def f():\n    return 1\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    entered, release, second_done = threading.Event(), threading.Event(), threading.Event()

    class Slow:
        def __reduce__(self) -> tuple[type, tuple[int]]:
            entered.set()
            release.wait(10)
            return (int, (0,))

    first = threading.Thread(
        target=_wire.by_value, args=((Slow(), module.f),), kwargs={"modules": [module.__name__]}
    )
    first.start()
    try:
        assert entered.wait(10)

        def second() -> None:
            _wire.by_value(module.f, modules=[module.__name__])
            second_done.set()

        other = threading.Thread(target=second)
        other.start()
        assert not second_done.wait(0.3)  # it waits for the first to finish
    finally:
        release.set()
        first.join()
    other.join()
    assert second_done.is_set()
    assert module.__name__ not in cloudpickle.list_registry_pickle_by_value()


BROKEN_IN_WORKERS = """
import os
if os.getpid() != int(os.environ["CALLER_PID"]):
    raise ImportError("only the caller can import this")

def double(x):
    return 2 * x
"""


@pytest.mark.timeout(60)
def test_a_function_a_worker_cannot_load_is_named_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "caller_only.py").write_text(BROKEN_IN_WORKERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CALLER_PID", str(os.getpid()))
    import caller_only  # type: ignore[import-not-found]

    try:
        with pytest.raises(mt.WorkerStartError, match="function could not be loaded") as caught:
            mt.map(caller_only.double, [1, 2], workers=1)
        assert "initializer" not in str(caught.value)
        assert "only the caller can import this" in str(caught.value)
    finally:
        sys.modules.pop("caller_only", None)


SLOW_IMPORT = """
import os, time
if os.getpid() != int(os.environ["CALLER_PID"]):  # a model loaded at import, say
    time.sleep(1.5)
    with open(os.environ["IMPORTS_LOG"], "a") as log:
        log.write("imported\\n")

def double(x):
    return 2 * x
"""


@needs_fork
@pytest.mark.timeout(60)
def test_a_module_slow_to_import_is_waited_for_and_imported_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The zygote's import outlasts many polls: it is waited for, not given up on (which would
    # make each worker a fresh interpreter importing it again).
    monkeypatch.setattr(_zygote, "REPLY_POLL", 0.1)
    (tmp_path / "slow_import.py").write_text(SLOW_IMPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CALLER_PID", str(os.getpid()))
    monkeypatch.setenv("IMPORTS_LOG", str(tmp_path / "imports.log"))
    monkeypatch.setenv("A_ZYGOTE_OF_ITS_OWN", "slow")
    import slow_import  # type: ignore[import-not-found]

    try:
        assert mt.map(slow_import.double, [1, 2, 3], workers=2) == [2, 4, 6]
        assert latest_zygote().usable
        assert (tmp_path / "imports.log").read_text() == "imported\n"  # in the zygote only
    finally:
        sys.modules.pop("slow_import", None)


@pytest.mark.timeout(60)
def test_a_frozen_program_is_told_to_fork_instead_of_starting_itself_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PyInstaller's sys.executable is the program: "sys.executable -c ..." would run it again.
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    before = dict(_zygote._zygotes)
    with pytest.raises(mt.WorkerStartError, match=r"frozen program.*start_method='fork'"):
        mt.map(abs, [-1, -2], workers=2)
    _start.prestart()
    assert _zygote._zygotes == before  # nothing was started
    if _platform.CAN_FORK:
        assert mt.map(abs, [-1, -2], workers=2, start_method="fork") == [1, 2]


@pytest.mark.usefixtures("each_start_method")
def test_a_worker_starts_in_the_callers_working_directory_even_once_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh interpreter would start there (deleted or not); the zygote was told the path,
    # and os.getcwd() of a deleted directory raised before any worker started.
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert mt.map(faults.working_directory, [1], workers=1) == [str(here)]
    here.rmdir()
    assert mt.map(faults.working_directory, [1], workers=1) == [f"{here} (deleted)"]


@pytest.mark.usefixtures("each_start_method")
def test_a_worker_has_the_umask_cpus_and_limits_the_caller_has_at_the_call() -> None:
    # As a fresh interpreter started then would: the zygote started before the caller
    # changed them, and its forks kept its own.
    import resource

    assert mt.map(abs, [-1], workers=1) == [1]  # a zygote is up
    cpus = os.sched_getaffinity(0)
    files = resource.getrlimit(resource.RLIMIT_NOFILE)
    mask = os.umask(0o027)
    try:
        os.sched_setaffinity(0, {min(cpus)})
        resource.setrlimit(resource.RLIMIT_NOFILE, (files[0] - 1, files[1]))
        got = mt.map(faults.process_state, [1], workers=1)
        assert got == [(0o027, [min(cpus)], (files[0] - 1, files[1]))]
    finally:
        os.umask(mask)
        os.sched_setaffinity(0, cpus)
        resource.setrlimit(resource.RLIMIT_NOFILE, files)
