"""``multitrack run``: where inputs come from and where records go.

::

    INPUT ... | -a FILE | --glob PATTERN | stdin ──▶ Inputs ──(raw, args, kwargs | bad)──▶ Task
                    formats: lines (default), -0, --json, --csv
    results ──▶ Records: JSON Lines (or values) on stdout, a GNU parallel joblog, the summary

Inputs are read lazily (a 10-million-line file runs in flat memory); only a regular file is
scanned once beforehand to count its lines, so the bar has a total and an ETA. Blank lines
are skipped (as xargs does). The *raw* input (the line, the parsed JSON value, the CSV row as
a dict) is what a record shows as ``"input"``; the arguments are what the function receives.

An input that cannot be read as arguments (a line that is not JSON, a CSV row of the wrong
width) does not stop the run: it becomes a ``Task`` whose ``bad`` says why, and so the failure
of that one task. The first input is checked before any work starts (``_cli_run``).

Example:
    >>> import io
    >>> inputs = Inputs.from_stream(io.StringIO('[1, 2]\\n{"size": 3}\\n\\n"x"\\nnope\\n'), "json")
    >>> [(raw, args, kwargs, bad is None) for raw, args, kwargs, bad in inputs]
    ... # doctest: +NORMALIZE_WHITESPACE
    [([1, 2], (1, 2), {}, True), ({'size': 3}, (), {'size': 3}, True),
     ('x', ('x',), {}, True), ('nope', (), {}, False)]
"""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from multitrack._errors import RemoteError, RemoteTraceback, TaskError, TaskTimeout, WorkerCrashed

__all__ = ["JOBLOG_HEADER", "Inputs", "Joblog", "Records", "describe_failure", "open_input"]

Parsed = tuple[Any, tuple[Any, ...], dict[str, Any], "str | None"]  # raw, args, kwargs, bad

#: GNU parallel's --joblog columns, so existing tooling reads ours
JOBLOG_HEADER = "Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"
_BLOCK = 1 << 16


def open_input(path: str, *, csv_format: bool) -> IO[str]:
    """``-a PATH`` opened for reading (``-`` is stdin); ``OSError`` when it cannot be.
    Undecodable bytes survive as surrogates (file names are bytes on POSIX)."""
    if path == "-":
        return sys.stdin
    if os.path.isdir(path):
        raise IsADirectoryError(f"Is a directory: {path!r}")
    return open(  # the file lives as long as the run reading it
        path, encoding="utf-8", errors="surrogateescape", newline="" if csv_format else None
    )


class Inputs:
    """The inputs of one run, parsed lazily; ``__length_hint__`` is the count when it is
    known without reading them (positional inputs, a glob, a regular file)."""

    def __init__(self, raws: Iterable[Any], parse: Callable[[Any], Parsed], total: int | None):
        self._raws, self._parse, self._total = raws, parse, total

    def __iter__(self) -> Iterator[Parsed]:
        return map(self._parse, self._raws)

    def __length_hint__(self) -> int:
        return self._total if self._total is not None else NotImplemented

    @classmethod
    def from_strings(cls, strings: list[str], fmt: str) -> Inputs:
        """Inputs given on the command line (after the function, or from ``--glob``)."""
        return cls(strings, _PARSERS[fmt], len(strings))

    @classmethod
    def from_glob(cls, pattern: str) -> Inputs:
        """Paths matching ``pattern`` (``**`` recurses), sorted so a rerun sees the same
        order."""
        return cls.from_strings(sorted(glob.glob(pattern, recursive=True)), "lines")

    @classmethod
    def from_stream(cls, stream: IO[str], fmt: str, *, null: bool = False) -> Inputs:
        """One input per line (or per NUL-separated item with ``null``) of ``stream``; with
        ``fmt="csv"``, one per row after the header."""
        total = _count_items(stream, null=null)
        if fmt == "csv":
            reader = csv.DictReader(_items(stream, null=True) if null else stream)
            return cls(reader, _parse_row, None if total is None else max(0, total - 1))
        return cls(_items(stream, null=null), _PARSERS[fmt], total)


def _items(stream: IO[str], *, null: bool) -> Iterator[str]:
    if not null:
        for line in stream:
            item = line.rstrip("\r\n")
            if item.strip():
                yield item
        return
    rest = ""
    while True:
        block = stream.read(_BLOCK)
        if not block:
            break
        *done, rest = (rest + block).split("\0")
        yield from (item for item in done if item)
    if rest:
        yield rest


def _count_items(stream: IO[str], *, null: bool) -> int | None:
    """Separators in a regular file (plus an unterminated last item), read in binary
    beforehand; ``None`` for a pipe or a terminal. Blank lines make it an overestimate,
    which the bar corrects at the end."""
    name = getattr(stream, "name", None)
    if stream is sys.stdin or not isinstance(name, str) or not os.path.isfile(name):
        return None
    sep = b"\0" if null else b"\n"
    count, last = 0, b""
    with open(name, "rb") as raw:
        while block := raw.read(_BLOCK * 16):
            count += block.count(sep)
            last = block[-1:]
    return count + (1 if last and last != sep else 0)


def _parse_line(raw: str) -> Parsed:
    return raw, (raw,), {}, None


def _parse_json(raw: str) -> Parsed:
    try:
        value = json.loads(raw)
    except ValueError as exc:
        return raw, (), {}, f"not JSON: {exc}: {raw[:200]!r}"
    if isinstance(value, list):
        return value, tuple(value), {}, None
    if isinstance(value, dict):
        return value, (), value, None
    return value, (value,), {}, None


def _parse_row(row: dict[Any, Any]) -> Parsed:
    if None in row:
        return row.pop(None), (), {}, f"CSV row has more fields than the header: {row}"
    missing = [key for key, value in row.items() if value is None]
    if missing:
        return row, (), {}, f"CSV row has no value for {', '.join(missing)}"
    return row, (), row, None


_PARSERS: dict[str, Callable[[Any], Parsed]] = {"lines": _parse_line, "json": _parse_json}


# -- output -----------------------------------------------------------------------------------


def describe_failure(
    error: TaskError, timeout: float | None
) -> tuple[dict[str, Any], float | None, float | None]:
    """A failure as the record's ``error`` object, with the seconds and the wall-clock start
    of its last attempt when known (the worker times an exception the task raised; a timed
    out task ran ``timeout`` seconds; a crash has no timing)."""
    cause = error.__cause__
    timing = getattr(cause, "_multitrack_run_timing", None) if cause is not None else None
    if isinstance(error, (WorkerCrashed, TaskTimeout)) or cause is None:
        kind, message, trace = type(error).__name__, str(error), None
    elif isinstance(cause, RemoteError):
        kind, message, trace = cause.type_name, cause.message, cause.traceback_text
    else:
        kind, message = type(cause).__qualname__, _safe_str(cause)
        remote = cause.__cause__
        trace = remote.text if isinstance(remote, RemoteTraceback) else _local_traceback(cause)
    if trace:
        trace = _without_our_frames(trace)
    started, seconds = timing if isinstance(timing, tuple) and len(timing) == 2 else (None, None)
    if isinstance(error, TaskTimeout):
        seconds = timeout
    return {"type": kind, "message": message, "traceback": trace}, seconds, started


_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _without_our_frames(trace: str) -> str:
    """The traceback text without multitrack's own frames (the worker loop, the timing
    wrapper): the user's frames are what the record is for."""
    kept, skipping = [], False
    for line in trace.splitlines(keepends=True):
        if line.startswith('  File "'):
            skipping = line[8:].startswith(_OURS)
        elif not (skipping and line.startswith("    ")):
            skipping = False
        if not skipping:
            kept.append(line)
    return "".join(kept)


def _local_traceback(exc: BaseException) -> str | None:
    if exc.__traceback__ is None:
        return None
    import traceback

    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<str() of {type(value).__name__} failed>"


class Records:
    """Writes one record per input on ``out`` (``output``: ``jsonl``, ``value`` or
    ``none``) and keeps what the summary needs."""

    def __init__(self, out: IO[str], output: str) -> None:
        self.out, self.output = out, output
        self.succeeded = 0
        self.failures: Counter[str] = Counter()
        self.first_failure: str | None = None

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def success(
        self, index: int, raw: Any, value: Any, seconds: float, attempts: int | None
    ) -> None:
        self.succeeded += 1
        if self.output == "value":
            self._write(value if isinstance(value, str) else _safe_repr(value))
        elif self.output == "jsonl":
            record: dict[str, Any] = {"index": index, "input": raw, "ok": True}
            try:
                record["value"] = _json_value(value)
            except (TypeError, ValueError, RecursionError):
                record.update(value=_safe_repr(value), value_repr=True)
                record["value_type"] = _type_name(value)
            record.update(seconds=round(seconds, 6), attempts=attempts)
            self._write(_dumps(record))

    def failure(
        self,
        index: int,
        raw: Any,
        error: dict[str, Any],
        seconds: float | None,
        attempts: int,
    ) -> None:
        self.failures[error["type"]] += 1
        if self.first_failure is None:
            self.first_failure = f"input {index} {_short(raw)}: {error['type']}: {error['message']}"
        if self.output == "jsonl":
            record = {"index": index, "input": raw, "ok": False, "error": error}
            record.update(seconds=None if seconds is None else round(seconds, 6), attempts=attempts)
            self._write(_dumps(record))

    def _write(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()  # records reach a pipe (| jq, | head) as they are made

    def summary(self) -> str | None:
        """The stderr summary: one line, or ``None`` when nothing failed."""
        if not self.failures:
            return None
        kinds = ", ".join(f"{kind} x{count}" for kind, count in self.failures.most_common())
        total = self.failed + self.succeeded
        return (
            f"multitrack run: {self.failed} of {total} tasks failed ({kinds}); "
            f"first: {self.first_failure}"
        )


def _json_value(value: Any) -> Any:
    """``value`` if JSON holds it exactly enough (tuples become lists), else ``ValueError``."""
    json.dumps(value, allow_nan=False)  # TypeError for objects, ValueError for NaN/inf
    return value


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, allow_nan=False, default=_safe_repr)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<repr() of {type(value).__name__} failed>"


def _type_name(value: Any) -> str:
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _short(raw: Any, limit: int = 80) -> str:
    text = _safe_repr(raw)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Joblog:
    """GNU parallel's ``--joblog`` TSV, one line per finished task, in the order records
    are written: Seq (index + 1), Host ``:`` (this machine, as GNU parallel writes it),
    Starttime (epoch seconds), JobRuntime (seconds), Send and Receive 0 (no bytes are piped
    to or from a function), Exitval 0 (returned) or 1 (failed), Signal (the number of the
    signal that killed a crashed worker, 9 for a task killed at its timeout, else 0), and
    Command (the call with its arguments as the input gave them, before conversion by
    annotation, as Python literals: tabs and newlines are escaped)."""

    def __init__(self, file: IO[str]) -> None:
        self.file = file
        file.write(JOBLOG_HEADER)
        file.flush()

    def add(
        self,
        seq: int,
        started: float | None,
        seconds: float | None,
        exitval: int,
        signal: int,
        command: str,
    ) -> None:
        runtime = seconds if seconds is not None and math.isfinite(seconds) else 0.0
        start = started if started is not None else time.time() - runtime
        self.file.write(
            f"{seq}\t:\t{start:.3f}\t{runtime:9.3f}\t0\t0\t{exitval}\t{signal}\t{command}\n"
        )
        self.file.flush()

    def close(self) -> None:
        self.file.close()
