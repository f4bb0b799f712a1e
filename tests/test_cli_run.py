"""``multitrack run``: every option and every exit status, through the real command in a
subprocess (``python -m multitrack run ...``), on small inputs with ``-j 2``.

The functions live in a ``.py`` file written by each test into its own folder, which is not
on ``sys.path`` (the command imports it by path), or in a module of that folder imported by
name (``cwd`` is the folder). A hang fails the test: every subprocess has a time limit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

RUN_TIMEOUT = 45.0

FUNCTIONS = """
import os, signal, time
from pathlib import Path

STATE = "unset"


def setup():
    global STATE
    STATE = "ready"


def failing_setup():
    raise OSError("no model here")


def state(x):
    return f"{STATE}:{x}"


def square(n: int) -> int:
    if n == 3:
        raise ValueError("three is bad")
    return n * n


def add(a: int, b: int = 0, *, scale: float = 1.0):
    return (a + b) * scale


def size(path: Path) -> int:
    return path.stat().st_size


def flag(on: bool) -> str:
    return "yes" if on else "no"


def echo(x):
    return x


def nap(seconds: float):
    time.sleep(seconds)
    return seconds


def crash(x):
    if x == "2":
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def fail_odd(n: int):
    if n % 2:
        raise RuntimeError(f"odd {n}")
    return n


def fail_odd_slowly(n: int):
    time.sleep(0.05)
    return fail_odd(n)


def opaque(x):
    return object()


def not_a_number(x):
    return float("nan")


def pid(x):
    return os.getpid()


def one_arg(x):
    return x


def logged(n: int):
    Path("runs", f"{n}-{time.monotonic_ns()}").touch()
    if n == 3:
        raise ValueError("three is bad")
    return n * n


def logged_slowly(n: int):
    time.sleep(0.02)
    Path("runs", f"{n}-{time.monotonic_ns()}").touch()
    return n
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "fns.py").write_text(FUNCTIONS)
    return tmp_path


def run(
    *args: str,
    cwd: Path,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m multitrack run ARGS`` in ``cwd``; stdin is empty unless given."""
    return subprocess.run(
        [sys.executable, "-m", "multitrack", "run", *args],
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env={**os.environ, "MULTITRACK_PROGRESS": "1", **(env or {})},
        timeout=RUN_TIMEOUT,
        check=False,
    )


def records(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in done.stdout.splitlines()]


def values(done: subprocess.CompletedProcess[str]) -> list[Any]:
    return [record.get("value") for record in records(done)]


# -- inputs -----------------------------------------------------------------------------------


def test_positional_inputs_give_ordered_json_records(folder: Path) -> None:
    done = run("fns.py:square", "1", "2", "4", "-j", "2", "--progress", "none", cwd=folder)

    assert done.returncode == 0, done.stderr
    assert records(done) == [
        {
            "index": i,
            "input": str(n),
            "ok": True,
            "value": n * n,
            "seconds": r["seconds"],
            "attempts": 1,
        }
        for i, (n, r) in enumerate(zip([1, 2, 4], records(done), strict=True))
    ]
    assert all(isinstance(r["seconds"], float) and r["seconds"] >= 0 for r in records(done))
    assert done.stderr == ""


def test_a_module_by_name_from_the_current_folder(folder: Path) -> None:
    done = run("fns:square", "5", "--progress", "none", cwd=folder)

    assert done.returncode == 0, done.stderr
    assert values(done) == [25]


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_a_file_outside_sys_path_with_its_initializer(folder: Path, start: str) -> None:
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    env = {"MULTITRACK_START_METHOD": start}

    done = run(
        str(folder / "fns.py") + ":state",
        "a",
        "b",
        "--init",
        str(folder / "fns.py") + ":setup",
        "-j",
        "2",
        "--progress",
        "none",
        cwd=elsewhere,
        env=env,
    )

    assert done.returncode == 0, done.stderr
    assert values(done) == ["ready:a", "ready:b"]


def test_arg_file_and_stdin_one_input_per_line(folder: Path) -> None:
    (folder / "list.txt").write_text("1\n2\n\n4\n")

    from_file = run("fns.py:square", "-a", "list.txt", "-j", "2", "--progress", "none", cwd=folder)
    from_stdin = run("fns.py:square", "--progress", "none", cwd=folder, stdin="1\n2\n\n4\n")
    dash = run("fns.py:square", "-a", "-", "--progress", "none", cwd=folder, stdin="4\n")

    assert values(from_file) == values(from_stdin) == [1, 4, 16]  # the blank line is skipped
    assert values(dash) == [16]


def test_null_separated_inputs(folder: Path) -> None:
    done = run("fns.py:echo", "-0", "--progress", "none", cwd=folder, stdin="a b\0c\nd\0")

    assert values(done) == ["a b", "c\nd"]


def test_glob_is_sorted_and_paths_are_converted(folder: Path) -> None:
    (folder / "data").mkdir()
    for name, size in [("b.bin", 20), ("a.bin", 10), ("c.txt", 5)]:
        (folder / "data" / name).write_bytes(b"x" * size)

    done = run("fns.py:size", "--glob", "data/*.bin", "-j", "2", "--progress", "none", cwd=folder)

    assert done.returncode == 0, done.stderr
    assert [(r["input"], r["value"]) for r in records(done)] == [
        ("data/a.bin", 10),
        ("data/b.bin", 20),
    ]


def test_json_lines_give_args_and_kwargs(folder: Path) -> None:
    lines = '[1, 2]\n{"a": 3, "scale": "2"}\n5\n'

    done = run("fns.py:add", "--json", "--progress", "none", cwd=folder, stdin=lines)

    assert done.returncode == 0, done.stderr
    assert [(r["input"], r["value"]) for r in records(done)] == [
        ([1, 2], 3.0),
        ({"a": 3, "scale": "2"}, 6.0),
        (5, 5.0),
    ]


def test_csv_header_names_the_keywords_and_params_bind(folder: Path) -> None:
    (folder / "t.csv").write_text("a,b\n1,2\n3,4\n")

    done = run(
        "fns.py:add", "--csv", "-a", "t.csv", "-p", "scale=10", "--progress", "none", cwd=folder
    )

    assert done.returncode == 0, done.stderr
    assert [(r["input"], r["value"]) for r in records(done)] == [
        ({"a": "1", "b": "2"}, 30.0),
        ({"a": "3", "b": "4"}, 70.0),
    ]


def test_bool_annotation(folder: Path) -> None:
    done = run("fns.py:flag", "yes", "0", "false", "--progress", "none", cwd=folder)

    assert values(done) == ["yes", "no", "no"]


def test_a_later_bad_input_fails_only_its_task(folder: Path) -> None:
    done = run("fns.py:add", "--json", "--progress", "none", cwd=folder, stdin="[1]\n[oops\n[2]\n")

    assert done.returncode == 1
    found = records(done)
    assert [r["ok"] for r in found] == [True, False, True]
    assert found[1]["error"]["type"] == "InputError"
    assert "not JSON" in found[1]["error"]["message"]


# -- output -----------------------------------------------------------------------------------


def test_failures_are_records_with_the_remote_traceback_and_a_summary(folder: Path) -> None:
    done = run("fns.py:square", "1", "3", "-j", "2", cwd=folder)

    assert done.returncode == 1
    ok, failed = records(done)
    assert ok["ok"] is True and failed["ok"] is False and "value" not in failed
    error = failed["error"]
    assert error["type"] == "ValueError" and error["message"] == "three is bad"
    assert 'fns.py", line' in error["traceback"] and "raise ValueError" in error["traceback"]
    assert "multitrack/" not in error["traceback"]  # the user's frames only
    assert failed["attempts"] == 1 and isinstance(failed["seconds"], float)
    # the end-of-run report, as for the API (with its first traceback)
    assert "1 ok · 1 failed (1 ValueError)" in done.stderr
    assert "multitrack run: 1 of 2" not in done.stderr  # said once, not twice
    quiet = run("fns.py:square", "1", "3", "-j", "2", "--progress", "none", cwd=folder)
    assert "multitrack run: 1 of 2 tasks failed (ValueError x1)" in quiet.stderr
    assert "Traceback" not in quiet.stderr


def test_output_value_prints_strings_as_they_are(folder: Path) -> None:
    done = run("fns.py:echo", "a b", "c", "--output", "value", "--progress", "none", cwd=folder)
    squares = run("fns.py:square", "2", "3", "--output", "value", "--progress", "none", cwd=folder)
    nothing = run("fns.py:echo", "a", "--output", "none", "--progress", "none", cwd=folder)

    assert done.stdout == "a b\nc\n"
    assert squares.stdout == "4\n" and squares.returncode == 1  # a failure prints nothing
    assert nothing.stdout == "" and nothing.returncode == 0


def test_values_json_cannot_hold_are_written_as_repr(folder: Path) -> None:
    opaque = run("fns.py:opaque", "a", "--progress", "none", cwd=folder)
    nan = run("fns.py:not_a_number", "a", "--progress", "none", cwd=folder)

    (record,) = records(opaque)
    assert record["value"].startswith("<object object at 0x")
    assert record["value_repr"] is True and record["value_type"] == "object"
    assert records(nan)[0]["value"] == "nan" and records(nan)[0]["value_repr"] is True


def test_unordered_gives_completion_order_with_indices(folder: Path) -> None:
    done = run(
        "fns.py:nap", "0.6", "0.01", "-j", "2", "--unordered", "--progress", "none", cwd=folder
    )

    assert done.returncode == 0, done.stderr
    assert [r["index"] for r in records(done)] == [1, 0]


@pytest.mark.parametrize(("mode", "marker"), [("log", "echo: done 2/2"), ("none", None)])
def test_progress_goes_to_stderr(folder: Path, mode: str, marker: str | None) -> None:
    done = run("fns.py:echo", "a", "b", "--progress", mode, cwd=folder)

    assert done.returncode == 0 and len(records(done)) == 2
    if marker is None:
        assert done.stderr == ""
    else:
        assert marker in done.stderr


def test_joblog_has_gnu_parallel_columns(folder: Path) -> None:
    done = run("fns.py:square", "2", "3", "--joblog", "jobs.tsv", "--progress", "none", cwd=folder)

    lines = (folder / "jobs.tsv").read_text().splitlines()
    assert done.returncode == 1
    assert lines[0].split("\t") == [
        "Seq",
        "Host",
        "Starttime",
        "JobRuntime",
        "Send",
        "Receive",
        "Exitval",
        "Signal",
        "Command",
    ]
    rows = [line.split("\t") for line in lines[1:]]
    assert [(r[0], r[1], r[6], r[7], r[8]) for r in rows] == [
        ("1", ":", "0", "0", "square('2')"),
        ("2", ":", "1", "0", "square('3')"),
    ]
    assert abs(float(rows[0][2]) - time.time()) < 60 and float(rows[0][3]) >= 0


def test_dry_run_prints_the_calls_and_starts_nothing(folder: Path) -> None:
    done = run("fns.py:add", "1", "x", "2", "-p", "scale=2", "--dry-run", cwd=folder)

    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "add(1, scale=2.0)",
        "# input 1: InputError: argument a: cannot convert 'x' to int",
        "add(2, scale=2.0)",
    ]


# -- running ------------------------------------------------------------------------------------


def test_jobs_sets_the_number_of_workers(folder: Path) -> None:
    one = run("fns.py:pid", *"abcdef", "-j", "1", "--progress", "none", cwd=folder)
    share = run("fns.py:pid", "a", "-j", "50%", "--progress", "none", cwd=folder)

    assert len(set(values(one))) == 1
    assert share.returncode == 0


def test_timeout_kills_the_task_and_the_run_goes_on(folder: Path) -> None:
    done = run(
        "fns.py:nap",
        "30",
        "0.01",
        "--timeout",
        "0.5",
        "-j",
        "2",
        "--joblog",
        "j.tsv",
        "--progress",
        "none",
        cwd=folder,
    )

    assert done.returncode == 1
    timed_out, ok = records(done)
    assert timed_out["error"]["type"] == "TaskTimeout" and timed_out["seconds"] == 0.5
    assert ok["ok"] is True
    assert (folder / "j.tsv").read_text().splitlines()[1].split("\t")[6:8] == ["1", "9"]


def test_retries_count_attempts_and_a_crash_is_one_record(folder: Path) -> None:
    done = run(
        "fns.py:crash", "1", "2", "3", "--retries", "1", "-j", "2", "--progress", "none", cwd=folder
    )

    assert done.returncode == 1
    first, crashed, third = records(done)
    assert crashed["error"]["type"] == "WorkerCrashed" and "SIGKILL" in crashed["error"]["message"]
    assert crashed["attempts"] == 2 and crashed["seconds"] is None
    assert first["attempts"] is None and third["ok"] is True  # unknown for a success with retries


def test_halt_now_stops_at_the_first_failure(folder: Path) -> None:
    started = time.monotonic()
    done = run("fns.py:square", "1", "3", "--halt", "now,fail=1", "--progress", "none", cwd=folder)
    naps = run(
        "fns.py:nap",
        "0.01",
        "x",
        "30",
        "30",
        "--halt",
        "now,fail=1",
        "-j",
        "2",
        "--progress",
        "none",
        cwd=folder,
    )

    assert done.returncode == 1 and [r["ok"] for r in records(done)][-1] is False
    assert naps.returncode == 1, naps.stderr
    assert "halted by --halt now,fail=1" in naps.stderr
    assert time.monotonic() - started < 20  # the 30 s naps were killed


def test_halt_soon_stops_taking_inputs(folder: Path) -> None:
    """Tasks of 50 ms: the scheduler holds only a few at a time, so intake stops early and
    those it holds are finished and written."""
    inputs = "\n".join(str(n) for n in range(1, 61))

    done = run(
        "fns.py:fail_odd_slowly",
        "--halt",
        "soon,fail=2",
        "-j",
        "2",
        "--progress",
        "none",
        cwd=folder,
        stdin=inputs,
    )

    assert done.returncode == 1
    found = records(done)
    assert [r["index"] for r in found] == list(range(len(found)))  # no gap: held ones finished
    assert sum(not r["ok"] for r in found) >= 2 and len(found) < 30
    assert "halted by --halt soon,fail=2" in done.stderr


def test_backend_thread_and_serial(folder: Path) -> None:
    for backend in ("thread", "serial"):
        done = run("fns.py:square", "2", "--backend", backend, "--progress", "none", cwd=folder)
        assert values(done) == [4], done.stderr


# -- exit statuses and errors before any work ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuchmodule:fn", "1"], "cannot import module 'nosuchmodule': ModuleNotFoundError"),
        (["fns.py:nosuch", "1"], "file 'fns.py' (from fns.py:nosuch) has no attribute 'nosuch'"),
        (["missing.py:fn", "1"], "cannot read 'missing.py'"),
        (["fns:STATE", "1"], "STATE is a str, not a function"),
        (["fns.py:echo", "1", "--init", "fns.py:nope"], "has no attribute 'nope'"),
    ],
)
def test_a_function_that_cannot_be_imported_exits_3(
    folder: Path, args: list[str], message: str
) -> None:
    (folder / "broken.py").write_text("def f(:\n")

    done = run(*args, cwd=folder)

    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
    assert done.stdout == ""


def test_a_syntax_error_names_the_file_and_line(folder: Path) -> None:
    (folder / "broken.py").write_text("x = 1\ndef f(:\n")

    done = run("broken.py:f", "1", cwd=folder)

    assert done.returncode == 3
    assert "SyntaxError" in done.stderr and "broken.py, line 2" in done.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["fns.py:one_arg", "a", "-p", "y=2"], None, "got an unexpected keyword argument 'y'"),
        (["fns.py:add", "--json"], '{"z": 1}\n', "does not fit add(a: int"),
        (["fns.py:square", "x"], None, "input 0: argument n: cannot convert 'x' to int"),
        (["fns.py:square", "-a", "nofile.txt"], None, "cannot read -a nofile.txt"),
        (["fns.py:square", "-a", "."], None, "cannot read -a ."),
        (["fns.py:add", "--json"], "[1\n", "input 0: not JSON"),
        (["fns.py:square", "1", "--joblog", "no/such/dir/j.tsv"], None, "cannot write --joblog"),
    ],
)
def test_bad_input_exits_2_before_any_work(
    folder: Path, args: list[str], stdin: str | None, message: str
) -> None:
    done = run(*args, cwd=folder, stdin=stdin)

    assert done.returncode == 2, done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fns"], "must be MODULE:FUNCTION or FILE.py:FUNCTION"),
        (["fns.py:echo", "a", "--glob", "*"], "give inputs one way"),
        (["fns.py:echo", "--halt", "later,fail=1"], "argument --halt"),
        (["fns.py:echo", "--halt", "now,fail=0"], "argument --halt"),
        (["fns.py:echo", "-j", "0"], "argument -j/--jobs/--workers: must be at least 1"),
        (["fns.py:echo", "--timeout", "-1"], "argument --timeout"),
        (["fns.py:echo", "-p", "size"], "expected NAME=VALUE"),
        (["fns.py:echo", "--json", "--csv"], "not allowed with argument"),
        (["fns.py:echo", "a", "--backend", "serial", "--timeout", "1"], "timeout= cannot be"),
    ],
)
def test_usage_errors_exit_2_with_argparse_message(
    folder: Path, args: list[str], message: str
) -> None:
    done = run(*args, cwd=folder)

    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_initializer_that_raises_exits_3(folder: Path) -> None:
    done = run(
        "fns.py:echo", "a", "--init", "fns.py:failing_setup", "--progress", "none", cwd=folder
    )

    assert done.returncode == 3
    assert "initializer failed" in done.stderr and "OSError: no model here" in done.stderr
    assert "Traceback" not in done.stderr


def test_no_inputs_is_success_with_no_records(folder: Path) -> None:
    done = run("fns.py:echo", "--progress", "none", cwd=folder, stdin="")

    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_a_closed_stdout_ends_the_run_quietly(folder: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "multitrack",
            "run",
            "fns.py:nap",
            "--unordered",
            "-j",
            "2",
            "--progress",
            "none",
        ],
        cwd=folder,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("0.01\n" * 2000)
    proc.stdin.close()
    first = proc.stdout.readline()
    proc.stdout.close()  # | head -1
    try:
        proc.wait(timeout=RUN_TIMEOUT)
        err = proc.stderr.read() if proc.stderr is not None else ""
    finally:
        proc.kill()
    if proc.stderr is not None:
        proc.stderr.close()

    assert json.loads(first)["ok"] is True
    assert proc.returncode == 141, err
    assert err == ""


def test_ctrl_c_exits_130_and_leaves_no_worker(folder: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "multitrack",
            "run",
            "fns.py:nap",
            "30",
            "30",
            "-j",
            "2",
            "--progress",
            "log",
        ],
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while len(_workers_of(proc.pid)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        workers = _workers_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        proc.kill()
        proc.wait(timeout=RUN_TIMEOUT)

    assert proc.returncode == 130, err
    assert "multitrack: interrupted" in err and "Traceback" not in err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []


def _workers_of(pid: int) -> list[psutil.Process]:
    """The run's worker processes (in their own sessions, but still its children)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_help_names_every_option() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "multitrack", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )

    assert done.returncode == 0
    for option in (
        "-a FILE",
        "--glob PATTERN",
        "-0",
        "--json",
        "--csv",
        "-p NAME=VALUE",
        "-j N",
        "--unordered",
        "--progress",
        "--timeout SECONDS",
        "--retries N",
        "--joblog FILE",
        "--halt",
        "--backend",
        "--address",
        "--dry-run",
        "--init MODULE:FUNCTION",
        "--output",
        "exit status",
    ):
        assert option in done.stdout, option


# -- --checkpoint -----------------------------------------------------------------------------


def _ran(folder: Path) -> list[int]:
    return sorted(int(name.split("-")[0]) for name in os.listdir(folder / "runs"))


def test_checkpoint_reruns_only_what_has_no_stored_success(folder: Path) -> None:
    (folder / "runs").mkdir()
    command = ["fns.py:logged", "1", "2", "3", "4", "-j", "2", "--checkpoint", "run.sqlite"]
    first = run(*command, "--progress", "none", cwd=folder)
    assert first.returncode == 1 and _ran(folder) == [1, 2, 3, 4]
    second = run(*command, "--progress", "none", cwd=folder)
    assert second.returncode == 1
    assert records(second) == records(first) or values(second) == values(first)
    assert _ran(folder) == [1, 2, 3, 3, 4]  # the failure alone ran again


@pytest.mark.timeout(90)
def test_checkpoint_interrupted_with_ctrl_c_then_rerun(folder: Path) -> None:
    (folder / "runs").mkdir()
    (folder / "inputs.txt").write_text("\n".join(map(str, range(300))) + "\n")
    command = [sys.executable, "-m", "multitrack", "run", "fns.py:logged_slowly", "-a"]
    command += ["inputs.txt", "-j", "2", "--checkpoint", "run.sqlite", "--progress", "none"]
    proc = subprocess.Popen(command, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + RUN_TIMEOUT
    while len(os.listdir(folder / "runs")) < 60 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 130, err
    assert b"rerun the same command to resume" in err
    before = len(_ran(folder))
    rerun = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert [json.loads(line)["value"] for line in rerun.stdout.splitlines()] == list(range(300))
    assert set(_ran(folder)) == set(range(300))
    # at least 60 had run before Ctrl-C: all but the last chunk or two of them were stored
    assert len(_ran(folder)) - before <= 300 - 20
