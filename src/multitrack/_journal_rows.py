"""The checkpoint journal's on-disk format: span rows, the task index built from them, and
result files. ``_checkpoint.Journal`` owns the file, its lock and its commits; this module
owns what the rows hold and how they become a per-task index.

::

    a run  ──▶ spans: one row per finished span of a chunk (or per failure)
               │  indices   first + count, or the list of input positions
               │  identity  args: the tasks' arguments, pickled in one call (plain builtins
               │                  only), keys computed later;  or keys (+ occurrences)
               │  outcome   payload: the values' list as the worker pickled it (> 64 KiB:
               │            a file in run.sqlite.d/), skip: positions that failed; or an error
               ▼
    the next open ──index_spans──▶ tasks: (key, occurrence) ──▶ (span, position), one row a task

Why spans, and an index built on the next open (docs/performance.md): on tiny tasks a digest
and an indexed row per task cost 13 µs a task in the parent, sixty times the run itself. A
span costs one row and no per-task work, and the worker's bytes are stored as they came. Most
runs end and are never resumed; one that is pays for the index once, on its next open, where
it digests the arguments of every stored task.

Occurrences. Two equal inputs are two tasks: the journal keys on (key, occurrence), the
occurrence counting the earlier tasks of the input with the same key. A run that resumed a
journal counts them as it keys its tasks (``_resume``) and stores them (explicit). A run that
started a journal keys nothing: its spans are numbered when indexed, by input position among
the tasks it stored. That differs from counting only when an earlier equal task did not
finish: the later one's result then serves the first equal task of the rerun, which is a
result of the same arguments either way.

Arguments are stored only when ``plain_pickle`` succeeds: nothing but None, bool, int, float,
complex-free str and bytes, tuples, lists, dicts, sets, bytearrays. Those unpickle to equal
values in any process, so their keys computed later equal the keys computed now. Anything
else (paths, numpy arrays, a user's class) is keyed when stored.
"""

from __future__ import annotations

import array
import io
import os
import pickle
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

try:  # hashlib's own blake2b, without loading OpenSSL (3 ms on a first call) for nothing
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without it
    from hashlib import blake2b

from multitrack._keys import Occurrences, index_key, task_key

__all__ = [
    "APPLICATION_ID",
    "INLINE_LIMIT",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SPAN_LIMIT",
    "Span",
    "in_a_file",
    "index_spans",
    "keys_of",
    "pack_indices",
    "plain_pickle",
    "read_file",
    "remove_files",
    "write_file",
]

SCHEMA_VERSION = 2  # 1: a row and a pickle per task (refused: see _checkpoint._inspect)
APPLICATION_ID = 0x4D54524B  # "MTRK": tells a journal from any other SQLite file
INLINE_LIMIT = 64 * 1024  # results larger on average go to files (SQLite is faster below)
SPAN_LIMIT = 4 << 20  # and so does a span's payload larger than this, whatever its results

SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value);
CREATE TABLE spans (
    id INTEGER PRIMARY KEY, ok INTEGER NOT NULL,
    first INTEGER NOT NULL, count INTEGER NOT NULL, indices BLOB,
    args BLOB, keys BLOB, occurrences BLOB, skip BLOB,
    payload BLOB, file TEXT, size INTEGER, digest BLOB,
    error_type TEXT, error_message TEXT, error_traceback TEXT, error_pickle BLOB,
    seconds REAL NOT NULL, attempts INTEGER NOT NULL, finished REAL NOT NULL,
    indexed INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE tasks (
    key BLOB NOT NULL, occurrence INTEGER NOT NULL, idx INTEGER NOT NULL,
    span INTEGER NOT NULL, position INTEGER NOT NULL, ok INTEGER NOT NULL
);
CREATE UNIQUE INDEX tasks_by_key ON tasks (key, occurrence);
"""
SPAN_COLUMNS = (
    "ok, first, count, indices, args, keys, occurrences, skip, payload, file, size, digest, "
    "error_type, error_message, error_traceback, error_pickle, seconds, attempts, finished"
)
INSERT_SPAN = f"INSERT INTO spans ({SPAN_COLUMNS}) VALUES ({', '.join('?' * 19)})"


@dataclass(slots=True)
class Span:
    """A span waiting for its commit. Either ``args`` (the arguments, ``plain_pickle``d) or
    ``keys`` (16 bytes a task) names its tasks; ``occurrences`` (8 bytes a task) is ``None``
    when they are numbered at indexing. ``payload`` is the pickled list of values (``None``:
    a failure, described by ``error``; or stored in ``file``)."""

    indices: Sequence[int]
    args: bytes | None
    keys: bytes | None
    occurrences: bytes | None
    skip: Sequence[int]
    payload: bytes | None
    file: tuple[str, int, bytes] | None  # name, size, digest
    error: tuple[str, str, str, bytes | None] | None
    seconds: float
    attempts: int
    finished: float

    def row(self) -> tuple[Any, ...]:
        first, count, indices = pack_indices(self.indices)
        skip = array.array("q", self.skip).tobytes() if self.skip else None
        name, size, digest = self.file or (None, None, None)
        error = self.error or (None, None, None, None)
        return (
            int(self.error is None), first, count, indices, self.args, self.keys,
            self.occurrences, skip, self.payload, name, size, digest, *error,
            self.seconds, self.attempts, self.finished,
        )  # fmt: skip

    def stored_tasks(self) -> int:
        return len(self.indices) - len(self.skip)


def in_a_file(payload: bytes, tasks: int) -> bool:
    """Whether a span's payload goes to a file: its results are large (above ``INLINE_LIMIT``
    on average), or it is (above ``SPAN_LIMIT``). Many small results stay in the database:
    a file costs an fsync at the next commit."""
    return len(payload) > INLINE_LIMIT * max(1, tasks) or len(payload) > SPAN_LIMIT


def pack_indices(indices: Sequence[int]) -> tuple[int, int, bytes | None]:
    """(first, count, the list when it is not first, first + 1, ...)."""
    if isinstance(indices, range) and indices.step == 1:
        return indices.start, len(indices), None
    listed = array.array("q", indices)
    first = listed[0] if listed else 0
    if listed == array.array("q", range(first, first + len(listed))):
        return first, len(listed), None
    return first, len(listed), listed.tobytes()


def unpack_indices(first: int, count: int, blob: bytes | None) -> Sequence[int]:
    if blob is None:
        return range(first, first + count)
    return array.array("q", blob)


class _Plain(pickle.Pickler):
    """A pickler that notes any object that is not a builtin scalar or container (pickle's C
    code asks ``reducer_override`` only for those), at C speed for plain data."""

    foreign = False

    def reducer_override(self, obj: Any) -> Any:
        self.foreign = True
        return NotImplemented


def plain_pickle(values: list[Any]) -> bytes | None:
    """The pickle of ``values`` when it holds plain builtin data only, else ``None``.

    Example:
        >>> plain_pickle([1, "a", (2.5, b"x")]) is not None, plain_pickle([object()])
        (True, None)
    """
    out = io.BytesIO()
    pickler = _Plain(out, pickle.HIGHEST_PROTOCOL)
    pickler.fast = True  # no memo: 5 times faster on strings; a cycle raises instead
    try:
        pickler.dump(values)
    except Exception:
        return None
    return None if pickler.foreign else out.getvalue()


def keys_of(args: Iterable[Any], indices: Sequence[int]) -> tuple[bytes, list[int]]:
    """The tasks' keys, 16 bytes each, and the offsets of those keyed by their position
    (their arguments have no digest)."""
    keys, by_position = [], []
    for offset, (index, arg) in enumerate(zip(indices, args, strict=True)):
        key = task_key(arg)
        if key is None:
            key = index_key(index)
            by_position.append(offset)
        keys.append(key)
    return b"".join(keys), by_position


# -- indexing: spans to tasks, on open ------------------------------------------------------

_NEW_SPANS = (
    "SELECT id, ok, first, count, indices, args, keys, occurrences, skip "
    "FROM spans WHERE indexed = 0 ORDER BY id"
)
_INSERT_TASK = "INSERT OR REPLACE INTO tasks VALUES (?, ?, ?, ?, ?, ?)"


def index_spans(conn: sqlite3.Connection) -> int:
    """Give every task of the spans not indexed yet its row in ``tasks`` (caller holds a
    transaction). A task stored again replaces its earlier row (a failure replaced by its
    result). Returns how many tasks were indexed."""
    numbering = _Numbering(conn)
    done = 0
    spans = conn.cursor().execute(_NEW_SPANS)  # streamed: one span's arguments at a time
    for span, ok, first, count, indices, args, keys, occurrences, skip in spans:
        positions = unpack_indices(first, count, indices)
        blob = keys if keys is not None else _keys_from_args(args, positions)
        if blob is None:
            continue  # cannot be read: its tasks run again
        skipped = set(array.array("q", skip)) if skip else set()
        tasks = [
            (blob[16 * k : 16 * k + 16], index, span, k, ok)
            for k, index in enumerate(positions)
            if k not in skipped
        ]
        if occurrences is not None:
            numbers = array.array("q", occurrences)
            rows = ((key, numbers[span_k], i, s, span_k, o) for key, i, s, span_k, o in tasks)
            conn.executemany(_INSERT_TASK, rows)
        else:
            numbering.add(tasks)
        done += len(tasks)
    numbering.finish()
    conn.execute("UPDATE spans SET indexed = 1, args = NULL WHERE indexed = 0")
    return done


def _keys_from_args(args: bytes | None, positions: Sequence[int]) -> bytes | None:
    if args is None:
        return None
    try:
        values = pickle.loads(args)
    except Exception:
        return None
    if len(values) != len(positions):
        return None
    return keys_of(values, positions)[0]


class _Numbering:
    """Occurrence numbers for the tasks of a run that started the journal: the n-th stored
    task with a key, by input position, is occurrence n. A key seen once (almost all) is
    written at once; the tasks of a key that may have been seen before wait, and are
    numbered together with the one written at the end. Memory: the repeated tasks only.
    Such spans come only from a run that opened an empty journal, so no row of another run
    shares their keys."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.seen: Occurrences | None = None  # made on first use: 16 MB
        self.repeated: dict[bytes, list[tuple[int, int, int, int]]] = {}

    def add(self, tasks: list[tuple[bytes, int, int, int, int]]) -> None:
        if self.seen is None:
            self.seen = Occurrences()
        first = []
        for key, index, span, position, ok in tasks:
            if self.seen.next(key) == 0:
                first.append((key, 0, index, span, position, ok))
            else:
                self.repeated.setdefault(key, []).append((index, span, position, ok))
        self.conn.executemany(_INSERT_TASK, first)

    def finish(self) -> None:
        conn = self.conn
        for key, later in self.repeated.items():
            written = conn.execute(
                "SELECT idx, span, position, ok FROM tasks WHERE key = ?", (key,)
            ).fetchall()
            conn.execute("DELETE FROM tasks WHERE key = ?", (key,))
            every = sorted([*map(tuple, written), *later])
            conn.executemany(_INSERT_TASK, ((key, n, *task) for n, task in enumerate(every)))
        self.repeated.clear()


# -- result files: run.sqlite.d/<name>.pkl ----------------------------------------------------


def write_file(folder: str, name: str, payload: bytes) -> tuple[str, int, bytes]:
    """Write a large payload beside the journal, under a temporary name then renamed (fsync'd
    by the next commit, before the row naming it). (name, size, digest); raises ``OSError``
    with nothing left half-written."""
    final = os.path.join(folder, name)
    temporary = os.path.join(folder, f".tmp-{name}")
    try:
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(temporary, final)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return name, len(payload), blake2b(payload, digest_size=16).digest()


def read_file(folder: str, name: str, size: int, digest: bytes) -> bytes | None:
    """A payload file's bytes, or ``None`` when it is missing, short or damaged."""
    try:
        with open(os.path.join(folder, name), "rb") as file:
            data = file.read(size + 1)
    except OSError:
        return None
    if len(data) != size or blake2b(data, digest_size=16).digest() != digest:
        return None
    return data


def remove_files(folder: str, *, temporary_only: bool) -> None:
    """Remove the files half-written by a killed run (``temporary_only``), or every file."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(".tmp-") or (not temporary_only and name.endswith(".pkl")):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
