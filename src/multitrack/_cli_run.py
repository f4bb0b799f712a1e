"""``multitrack run MODULE:FUNCTION [INPUT ...]``: GNU parallel's job, at the level of a Python
function (no shell quoting, typed arguments, one structured record per input).

What one run does::

    parse options ─▶ load the function (exit 3) ─▶ open the inputs (exit 2)
        ─▶ check the first input against the signature (exit 2)      nothing has started yet
        ─▶ --dry-run: print the calls, exit 0
        ─▶ mt.imap(Job, tasks, errors="return"|"raise", ...) ─▶ Records (stdout), Joblog
        ─▶ the end-of-run report (stderr; with --progress none, a one-line summary of the
           failures instead), exit 0 all succeeded / 1 some task failed

Ordering, retries, timeouts, the bar and the fault model are the library's: the command is
``mt.imap`` over ``_cli_calls.Task`` objects, with ``_cli_calls.Job`` timing each call in the
worker. The decisions the command line adds:

* **Inputs.** Exactly one source: the arguments after the function, ``-a FILE`` (``-`` is
  stdin), ``--glob PATTERN`` (sorted; ``**`` recurses), or stdin when none is given (a usage
  error when stdin is a terminal, rather than waiting). One input per line (blank lines
  skipped), or per NUL-separated item with ``-0``. ``--json``: a list is positional arguments,
  an object keyword arguments, anything else one argument. ``--csv``: the header names the
  keyword arguments. A plain input is one positional ``str`` argument. String arguments are
  converted by the function's annotations (``int``, ``float``, ``bool``, ``pathlib.Path``,
  also ``X | None``); without one they stay strings. ``-p NAME=VALUE`` binds a keyword for
  every call, like ``functools.partial`` (an input's own keyword wins).
* **Errors before any work** (no worker started): a function that cannot be imported, or is
  not callable: exit 3. A first input the signature cannot take (``inspect.signature(...).bind``
  after conversion), an unreadable input file or joblog, a bad option: exit 2. A later input
  that cannot be read or converted is the failure of that task (``InputError``), not of the run.
* **Records.** JSON Lines on stdout, in input order (completion order with ``--unordered``):
  ``{"index", "input", "ok", "value" | "error": {"type", "message", "traceback"}, "seconds",
  "attempts"}``. ``input`` is the raw input (the line, the JSON value, the CSV row).
  ``seconds`` is the time of the function call alone, measured in the worker (for a failure:
  its last attempt when the task raised, ``timeout`` when it timed out, ``null`` when its
  worker crashed). ``attempts``: exact for a failure; for a success it is 1 without
  ``--retries``, and ``null`` with them (the library retries without telling which attempt
  succeeded, so the command does not guess). A value JSON cannot hold (an object, NaN) is
  written as its ``repr`` with ``"value_repr": true`` and ``"value_type"``. ``--output value``
  prints only the values (a ``str`` as it is, anything else as its ``repr``; failures print
  nothing there), ``--output none`` nothing (with ``--joblog``, say).
* **--halt** (default ``never``: run everything, summarise, exit 1). ``now,fail=N``: when the
  N-th failure is written, stop at once: running tasks are killed, results not yet written are
  dropped; with ``fail=1`` the run uses ``errors="raise"``, so the first failure stops it the
  moment it happens, even while earlier inputs are still running (their records are not
  written). ``soon,fail=N``: when the N-th failure is written, no further input is taken; the
  tasks the scheduler already holds (those running, queued on a worker, or done and waiting
  for their turn in input order) finish and are written. ``fail=P%``: when failures reach P%
  of the tasks finished so far, counted once at least ``100/P`` tasks have finished (so that
  one early failure is not 100%). Failures are counted in the order records are written. The
  exit status is 1.
* **--progress** ``auto`` (the library's default: a live bar on a terminal, plain lines every
  30 s otherwise), ``bar`` (the same: the live bar whenever stderr is a terminal), ``log``
  (plain lines always), ``none``. All on stderr; stdout holds only records.
* **Exit status**: 0 all succeeded, 1 some task failed, 2 bad usage or input, 3 the function
  could not be imported or the workers could not start (``--init`` raised, a backend is not
  installed), 130 Ctrl-C, 141 stdout was closed (``| head``: the run stops, its workers are
  stopped, no traceback; 128 + SIGPIPE, what a shell tool killed by the closed pipe returns).

This module imports only the standard library at import time (``multitrack --help`` builds
its parser); the engine is imported when the command runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from multitrack.cli import whole_number

__all__ = ["add_arguments", "run_command"]

OUTPUTS = ("jsonl", "value", "none")
PROGRESS = ("auto", "bar", "log", "none")
#: --progress as the library's ``progress=``; "bar" is auto's own choice on a terminal
PROGRESS_OPTION: dict[str, bool | str] = {"auto": True, "bar": True, "log": "log", "none": False}
BACKENDS = ("process", "thread", "serial", "dask", "ray")  # multitrack.backends.NAMES
EXIT_FAILED, EXIT_USAGE, EXIT_CANNOT_START, EXIT_PIPE = 1, 2, 3, 141

EPILOG = """\
inputs (one source): the INPUTs after the function, -a FILE, --glob PATTERN, or stdin.
  One input per line (blank lines skipped) is one str argument, converted by the function's
  annotation (int, float, bool, pathlib.Path). --json: a list is *args, an object **kwargs.
  --csv: the header names the keyword arguments.

output: one JSON record per input on stdout, in input order (GNU parallel's default is
  completion order; use --unordered for that):
  {"index": 0, "input": "a.png", "ok": true, "value": ..., "seconds": 0.81, "attempts": 1}
  {"index": 1, "input": "b.png", "ok": false, "error": {"type", "message", "traceback"}, ...}

exit status: 0 all succeeded, 1 some task failed, 2 bad usage or input, 3 the function could
  not be imported or the workers could not start, 130 Ctrl-C, 141 stdout closed (| head).

examples:
  multitrack run mypkg.images:resize --glob 'photos/**/*.jpg' -p size=200
  find . -name '*.json' -print0 | multitrack run ./check.py:validate -0 -j 4 --joblog jobs.tsv
  multitrack run scores.py:score --csv -a table.csv --output value
"""


def add_arguments(run: argparse.ArgumentParser) -> None:
    """The arguments of ``multitrack run`` (see the module docstring for their meaning)."""
    run.add_argument(
        "function",
        metavar="MODULE:FUNCTION",
        help="the function to run: an importable module (the current folder is on the path) "
        "or a path to a .py file, then a colon and the function's name",
    )
    run.add_argument("inputs", nargs="*", metavar="INPUT", help="inputs, one per call")
    _add_inputs(run.add_argument_group("inputs"))
    _add_running(run.add_argument_group("running"))
    _add_output(run.add_argument_group("output"))
    run.set_defaults(parser=run)


def _add_inputs(source: argparse._ArgumentGroup) -> None:
    source.add_argument(
        "-a",
        "--arg-file",
        metavar="FILE",
        help="read inputs from FILE, one per line ('-': stdin)",
    )
    source.add_argument(
        "--glob",
        metavar="PATTERN",
        help="inputs are the paths matching PATTERN, sorted ('**' recurses; quote it)",
    )
    source.add_argument(
        "-0", "--null", action="store_true", help="inputs are separated by NUL, not newlines"
    )
    formats = source.add_mutually_exclusive_group()
    formats.add_argument(
        "--json",
        "--jsonl",
        dest="json",
        action="store_true",
        help="each input is a JSON value: a list is positional arguments, an object keyword "
        "arguments, anything else one argument",
    )
    formats.add_argument(
        "--csv",
        action="store_true",
        help="inputs are CSV rows; the header names the keyword arguments",
    )
    source.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        type=_param,
        metavar="NAME=VALUE",
        help="bind NAME=VALUE for every call (converted like an input); repeatable",
    )


def _add_running(running: argparse._ArgumentGroup) -> None:
    running.add_argument(
        "-j",
        "--jobs",
        "--workers",
        dest="workers",
        type=_workers,
        metavar="N",
        help="workers: a number, or N%% of the usable CPUs (default: every usable CPU)",
    )
    running.add_argument(
        "--unordered",
        action="store_true",
        help="write records as tasks finish, not in input order",
    )
    running.add_argument(
        "--timeout",
        type=_duration,
        metavar="SECONDS",
        help="seconds one task may run (also 90s, 5m, 2h); past it its worker is killed and "
        "replaced, and the task fails with TaskTimeout",
    )
    running.add_argument(
        "--retries",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="extra attempts for a task that raised, crashed its worker or timed out",
    )
    running.add_argument(
        "--halt",
        type=_halt,
        default=None,
        metavar="WHEN,fail=N[%]",
        help="stop early: 'now,fail=1' kills running tasks at the first failure; "
        "'soon,fail=5%%' takes no new input once 5%% of finished tasks failed and lets "
        "the others finish; default 'never' (run everything)",
    )
    running.add_argument(
        "--init",
        metavar="MODULE:FUNCTION",
        help="run this function once in each worker before its first task",
    )
    running.add_argument(
        "--backend",
        choices=BACKENDS,
        default="process",
        help="where tasks run (default: process)",
    )
    running.add_argument(
        "--address", metavar="ADDRESS", help="with --backend dask or ray: the cluster to use"
    )
    running.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="keep finished records in FILE (SQLite); rerunning the same command runs only "
        "the inputs without a stored success",
    )
    running.add_argument(
        "--dry-run",
        action="store_true",
        help="print the calls that would run, one per line, and start nothing",
    )


def _add_output(output: argparse._ArgumentGroup) -> None:
    output.add_argument(
        "--output",
        choices=OUTPUTS,
        default="jsonl",
        help="stdout: a JSON record per input (default), only the values, or nothing",
    )
    output.add_argument(
        "--progress",
        choices=PROGRESS,
        default="auto",
        help="on stderr: auto (a live bar on a terminal, status lines otherwise), bar, "
        "log (status lines), none",
    )
    output.add_argument(
        "--joblog",
        metavar="FILE",
        help="write GNU parallel's joblog (TSV: Seq Host Starttime JobRuntime Send Receive "
        "Exitval Signal Command) to FILE",
    )


# -- argparse types ---------------------------------------------------------------------------


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _workers(text: str) -> int:
    try:
        if text.endswith("%"):
            from multitrack.backends._platform import usable_cpus

            share = float(text[:-1])
            if not math.isfinite(share) or share <= 0:
                raise ValueError(text)
            return max(1, int(usable_cpus() * share / 100))
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or N%, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    number, unit = (text[:-1], _UNITS[text[-1]]) if text[-1:] in _UNITS else (text, 1.0)
    try:
        seconds = float(number) * unit
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


@dataclass(frozen=True)
class Halt:
    """``--halt``: when to stop (``now`` or ``soon``) and after how many failures, or what
    percentage of the finished tasks.

    Example:
        >>> halt = _halt("soon,fail=10%")
        >>> halt.reached(failed=1, finished=9), halt.reached(failed=1, finished=10)
        (False, True)
    """

    when: str
    count: int | None = None
    percent: float | None = None

    def reached(self, failed: int, finished: int) -> bool:
        if self.count is not None:
            return failed >= self.count
        assert self.percent is not None
        return finished >= 100 / self.percent and failed * 100 >= self.percent * finished

    def __str__(self) -> str:
        threshold = f"{self.percent:g}%" if self.percent is not None else str(self.count)
        return f"{self.when},fail={threshold}"


def _halt(text: str) -> Halt | None:
    if text == "never":
        return None
    when, _, why = text.partition(",")
    key, _, threshold = why.partition("=")
    problem = None
    if when not in ("now", "soon"):
        problem = "WHEN must be 'now' or 'soon'"
    elif key != "fail":
        problem = "only fail=N or fail=P% is supported"
    else:
        try:
            if threshold.endswith("%"):
                percent = float(threshold[:-1])
                if 0 < percent <= 100:
                    return Halt(when, percent=percent)
            elif int(threshold) >= 1:
                return Halt(when, count=int(threshold))
        except ValueError:
            pass
        problem = "fail= takes a count of at least 1 or a percentage in (0, 100]"
    raise argparse.ArgumentTypeError(
        f"expected never, now,fail=N or soon,fail=P% ({problem}), got {text!r}"
    )


# -- the command ------------------------------------------------------------------------------


def run_command(args: argparse.Namespace) -> int:
    """``multitrack run``: the exit status (see the module docstring)."""
    from multitrack import _cli_calls as calls

    parser: argparse.ArgumentParser = args.parser
    try:
        fn = calls.load_function(args.function)
        init = calls.load_function(args.init, option="--init") if args.init else None
    except ValueError as exc:
        parser.error(str(exc))
    except calls.FunctionNotFound as exc:
        return _fail(str(exc), EXIT_CANNOT_START)
    inputs = _open_inputs(args, parser)
    if inputs is None:
        return EXIT_USAGE
    try:
        signature = calls.signature_of(fn)
    except (TypeError, ValueError):  # some builtins: Python cannot tell; the call will
        signature = None
    kinds = calls.convertible_parameters(signature) if signature is not None else {}
    job = calls.Job(fn, dict(args.param), kinds)
    name = getattr(fn, "name", None) or getattr(fn, "__name__", None) or args.function
    tasks = _Tasks(inputs)
    first = tasks.peek()
    if first is not None:
        problem = _check_first(job, signature, first, name)
        if problem:
            return _fail(problem, EXIT_USAGE)
    if args.dry_run:
        return _dry_run(job, tasks, name)
    return _Execution(args, job, init, tasks, name).run()


def _fail(message: str, status: int) -> int:
    print(f"multitrack run: {message}", file=sys.stderr)
    return status


def _open_inputs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    from multitrack._cli_io import Inputs, open_input

    given = [
        flag
        for flag, value in (
            ("INPUT", args.inputs),
            ("-a", args.arg_file),
            ("--glob", args.glob),
        )
        if value
    ]
    if len(given) > 1:
        parser.error(f"give inputs one way: {' and '.join(given)} were both given")
    fmt = "json" if args.json else "csv" if args.csv else "lines"
    if args.glob and (args.json or args.csv):
        parser.error("--glob gives paths: it cannot be read as --json or --csv")
    if args.null and (given and given[0] != "-a"):
        parser.error("-0 applies to -a FILE or stdin")
    if args.csv and args.inputs:
        parser.error("--csv reads a file or stdin, not INPUT arguments")
    if args.glob:
        inputs = Inputs.from_glob(args.glob)
        if inputs.__length_hint__() == 0:
            print(f"multitrack run: --glob {args.glob!r} matched no file", file=sys.stderr)
        return inputs
    if args.inputs:
        return Inputs.from_strings(args.inputs, fmt)
    path = args.arg_file or "-"
    if path == "-" and sys.stdin is not None and sys.stdin.isatty():
        parser.error("no inputs: give them after the function, with -a FILE, --glob, or on stdin")
    try:
        stream = open_input(path, csv_format=args.csv)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"multitrack run: cannot read -a {path}: {reason}", file=sys.stderr)
        return None
    return Inputs.from_stream(stream, fmt, null=args.null)


class _Tasks:
    """The inputs as ``Task`` objects, with the raw input of each task kept until its record
    is written (bounded by what the scheduler holds), and a switch that ends intake
    (``--halt soon``)."""

    def __init__(self, inputs: Any) -> None:
        self.inputs = inputs
        self.raw: dict[int, Any] = {}
        self.stopped = False
        self.taken = 0
        self._parsed: Iterator[Any] = iter(inputs)
        self._first: Any = None

    def peek(self) -> Any:
        """The first task, read now (so that it can be checked before any work)."""
        from multitrack._cli_calls import Task

        first = next(self._parsed, None)
        if first is None:
            return None
        raw, args, kwargs, bad = first
        self._first = (raw, Task(0, args, kwargs, bad))
        return self._first[1]

    def __iter__(self) -> Iterator[Any]:
        from multitrack._cli_calls import Task

        if self._first is not None:
            raw, task = self._first
            self._first = None
            self.raw[0] = raw
            self.taken = 1
            yield task
        for raw, args, kwargs, bad in self._parsed:
            if self.stopped:
                return
            index = self.taken
            self.raw[index] = raw
            self.taken += 1
            yield Task(index, args, kwargs, bad)

    def __length_hint__(self) -> int:
        hint: int = self.inputs.__length_hint__()
        return hint


def _check_first(job: Any, signature: Any, task: Any, name: str) -> str | None:
    """Why the first input cannot be a call of the function, or ``None``."""
    from multitrack._cli_calls import InputError, call_repr

    if task.bad is not None:
        return f"input 0: {task.bad}"
    try:
        args, kwargs = job.arguments(task)
        if signature is not None:
            signature.bind(*args, **kwargs)
    except InputError as exc:
        return f"input 0: {exc}"
    except TypeError as exc:
        given = call_repr(name, task.args, {**job.params, **task.kwargs})
        return f"{given} does not fit {name}{signature}: {exc}"
    return None


def _dry_run(job: Any, tasks: _Tasks, name: str) -> int:
    from multitrack._cli_calls import InputError, call_repr

    for task in tasks:
        try:
            print(call_repr(name, *job.arguments(task)))
        except (InputError, TypeError) as exc:
            print(f"# input {task.index}: {type(exc).__name__}: {exc}")
    return 0


class _Execution:
    """One real run: the imap, its records, its joblog, its halt and its exit status."""

    def __init__(self, args: argparse.Namespace, job: Any, init: Any, tasks: _Tasks, name: str):
        self.args, self.job, self.init, self.tasks, self.name = args, job, init, tasks, name
        self.halt: Halt | None = args.halt
        self.halted = False

    def run(self) -> int:
        import multitrack as mt
        from multitrack._cli_io import Records

        args = self.args
        joblog = self._open_joblog()
        if joblog is False:
            return EXIT_USAGE
        records = Records(sys.stdout, args.output)
        fail_fast = self.halt is not None and self.halt.when == "now" and self.halt.count == 1
        try:
            results = mt.imap(
                self.job,
                self.tasks,
                workers=args.workers,
                backend=args.backend,
                ordered=not args.unordered,
                progress=PROGRESS_OPTION[args.progress],
                desc=self.name,
                errors="raise" if fail_fast else "return",
                timeout=args.timeout,
                retries=args.retries,
                initializer=self.init,
                address=args.address,
                checkpoint=args.checkpoint,
                key=_task_key if args.checkpoint else None,
            )
        except (TypeError, ValueError) as exc:
            return _fail(str(exc), EXIT_USAGE)
        except ImportError as exc:
            return _fail(str(exc), EXIT_CANNOT_START)
        try:
            self._write_all(results, records, joblog)
        except BrokenPipeError:
            return self._stdout_closed(results)
        except (ImportError, mt.WorkerStartError) as exc:
            return _fail(_first_line(exc), EXIT_CANNOT_START)
        except mt.CheckpointError as exc:
            return _fail(str(exc), EXIT_USAGE)
        except KeyboardInterrupt:
            if args.checkpoint:
                print(
                    f"multitrack run: interrupted; {records.failed + records.succeeded} records "
                    f"written; rerun the same command to resume from {args.checkpoint}",
                    file=sys.stderr,
                )
            raise
        finally:
            results.close()  # type: ignore[attr-defined]  # stops the workers, if any run on
            if joblog:
                joblog.close()
        summary = records.summary()
        if summary and args.progress == "none":  # else the library's end-of-run report says it
            print(summary, file=sys.stderr)
        if self.halted:
            print(
                f"multitrack run: halted by --halt {self.halt} after {records.failed} "
                f"failure(s); {self.tasks.taken} inputs were taken, "
                f"{records.failed + records.succeeded} records written",
                file=sys.stderr,
            )
        return EXIT_FAILED if records.failed else 0

    def _open_joblog(self) -> Any:
        from multitrack._cli_io import Joblog

        if not self.args.joblog:
            return None
        try:
            file = open(self.args.joblog, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            print(
                f"multitrack run: cannot write --joblog {self.args.joblog}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return False
        return Joblog(file)

    def _write_all(self, results: Iterator[Any], records: Any, joblog: Any) -> None:
        import multitrack as mt

        try:
            for result in results:
                if isinstance(result, mt.TaskError):
                    self._failure(result, records, joblog)
                    if self._halt_now(records):
                        return
                else:
                    self._success(result, records, joblog)
        except mt.TaskError as error:  # --halt now,fail=1: errors="raise"
            self._failure(error, records, joblog)
            self.halted = True

    def _success(self, result: tuple[int, Any, float, float], records: Any, joblog: Any) -> None:
        index, value, started, seconds = result
        raw = self.tasks.raw.pop(index, None)
        records.success(index, raw, value, seconds, 1 if self.args.retries == 0 else None)
        if joblog:
            joblog.add(index + 1, started, seconds, 0, 0, self._command(raw, index))

    def _failure(self, error: Any, records: Any, joblog: Any) -> None:
        import signal

        from multitrack._cli_io import describe_failure

        index = error.index
        raw = self.tasks.raw.pop(index, None)
        described, seconds, started = describe_failure(error, self.args.timeout)
        records.failure(index, raw, described, seconds, error.attempts)
        if joblog:
            signum = 0
            if described["type"] == "TaskTimeout":
                signum = signal.SIGKILL.value
            elif getattr(error, "signal", None):
                signum = getattr(signal.Signals, error.signal, 0) or 0
            joblog.add(index + 1, started, seconds, 1, int(signum), self._command(raw, index))

    def _command(self, raw: Any, index: int) -> str:
        from multitrack._cli_calls import call_repr

        args, kwargs = _arguments_of(raw, self.args)
        return call_repr(self.name, args, {**dict(self.args.param), **kwargs})

    def _halt_now(self, records: Any) -> bool:
        """Apply ``--halt`` after a failure; ``True`` when the run must stop at once."""
        halt = self.halt
        if halt is None or not halt.reached(records.failed, records.failed + records.succeeded):
            return False
        self.halted = True
        self.tasks.stopped = True  # soon: no further input is taken
        return halt.when == "now"

    def _stdout_closed(self, results: Any) -> int:
        """``| head`` closed stdout: stop the workers and leave quietly (Python's docs, "Note
        on SIGPIPE": point stdout at devnull so that the exit's flush cannot fail again)."""
        results.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE


def _arguments_of(raw: Any, args: argparse.Namespace) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's arguments as the input gave them (before conversion), for the joblog."""
    if args.csv and isinstance(raw, dict):
        return (), raw
    if args.json:
        if isinstance(raw, list):
            return tuple(raw), {}
        if isinstance(raw, dict):
            return (), raw
    return (raw,), {}


def _task_key(task: Any) -> Any:
    """What names an input's record in ``--checkpoint``: its position and its arguments (the
    record carries its index, so a task moved elsewhere in the input runs again)."""
    return (task.index, task.args, tuple(sorted(task.kwargs.items())))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
