"""The checkpoint journal: finished tasks stored as they arrive, so a rerun runs only what is
missing (``checkpoint="run.sqlite"``).

::

    scheduler (the parent, the only writer)
      │ open ──▶ index the spans the last run stored (_journal_rows.index_spans)
      │ lookup(key, occurrence) ──▶ its task row ──▶ its span's values (unpickled once) ──▶ Stored
      │ record_span / record_failure ──▶ span rows buffered in memory; payloads > 64 KiB
      │                                  written at once to run.sqlite.d/<run>-<n>.pkl
      │ commit_due(now) ─ every `interval` s or `max_pending` tasks ─▶ commit():
      │       fsync the new result files and their folder, then one transaction for the rows
      ▼ close() ──▶ last commit, lock released
    run.sqlite (+ -wal, -shm)   run.sqlite.lock (flock, "pid host")   run.sqlite.d/ (0o700)

What a row holds and why a run writes one row per span, not per task: ``_journal_rows``.

Why it is shaped so (research notes, section 1):

* **One writer, no thread.** Only the parent writes, from its scheduler loop; workers never
  open the journal. SQLite in WAL mode with ``synchronous=NORMAL``: a commit survives the
  process being killed, and only a power loss can take back the last ones. A SIGKILL loses at
  most the spans of the last ``interval`` seconds; those tasks simply run again.
* **Nothing stored is lost, nothing wrong is returned.** A result file is fsync'd and renamed
  into place before the row naming it is committed, and its size and digest are checked when
  it is read back: a missing or truncated file means "not stored" (its tasks run again), never
  an error that loses the rest. A full disk raises ``CheckpointError`` after keeping every
  commit before it. A damaged file, a journal written by another version of multitrack, or a
  SQLite file that is not a journal is refused *without being touched* (it is inspected
  through a read-only connection first).
* **One run at a time.** ``run.sqlite.lock`` is held with ``flock`` for the journal's life,
  so a second run on the same journal (here or in another process) is refused with the
  holder's pid and host; the lock vanishes with its process, so a killed run never blocks the
  next one. Forked children drop their copy of the lock's descriptor.
* **Trusted like code.** A journal holds pickles, and loading a pickle runs code: only a
  journal, companion files and result folder owned by the current user and not writable by
  group or others is opened, and everything is created readable by its owner only.

The caller passes bytes (the values as pickled, the arguments as ``plain_pickle``d) and keys
(``_keys``); the journal unpickles a span's values when a task of it is looked up.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import socket
import sqlite3
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from multitrack._errors import CheckpointError
from multitrack._journal_rows import (
    APPLICATION_ID,
    INLINE_LIMIT,
    INSERT_SPAN,
    SCHEMA,
    SCHEMA_VERSION,
    Span,
    in_a_file,
    index_spans,
    read_file,
    remove_files,
    write_file,
)

__all__ = ["INLINE_LIMIT", "ON_CHANGE", "SCHEMA_VERSION", "Journal", "Stored"]

ON_CHANGE = ("keep", "restart", "refuse")
_MAX_PENDING_BYTES = 32 << 20  # inline payloads waiting for a commit
WAL_LIMIT = 4 << 20  # a close empties a WAL larger than this (SQLite's own checkpoint size)
_SPANS_KEPT = 8  # spans' values kept unpickled for the lookups of their other tasks
_TASK = "SELECT key, occurrence, idx, ok, span, position FROM tasks"
_SPAN = (
    "SELECT ok, payload, file, size, digest, error_type, error_message, error_traceback, "
    "error_pickle, seconds, attempts, finished FROM spans WHERE id = ?"
)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs microseconds per lookup
class Stored:
    """One task as the journal holds it: a result (``ok``, ``value``) or a failure
    (``error_type``, ``error_message``, ``error_traceback``, ``error_pickle``)."""

    key: bytes
    occurrence: int
    index: int
    ok: bool
    value: Any
    error_type: str | None
    error_message: str | None
    error_traceback: str | None
    error_pickle: bytes | None
    seconds: float
    attempts: int
    finished: float  # time.time() when it finished


class Journal:
    """The journal of one call; open it with ``Journal.open``.

    Loading a journal unpickles what it holds, and unpickling runs code: a journal is to be
    trusted like the code itself. Only journals owned by the current user and not writable by
    group or others are opened.

    Example:
        >>> import os, pickle, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "run.sqlite")
        >>> fn = ("mymod:resize_one", b"0" * 16)
        >>> with Journal.open(path, function=fn) as journal:
        ...     journal.record_span(range(5, 7), pickle.dumps(["a", "b"]), keys=b"k" * 32,
        ...                         occurrences=bytes(8) + (1).to_bytes(8, "little"), seconds=0.1)
        >>> with Journal.open(path, function=fn) as journal:
        ...     journal.lookup(b"k" * 16, 1).value, journal.reused_count
        ('b', 1)
    """

    def __init__(self, path: str, lock_fd: int, *, interval: float, max_pending: int) -> None:
        self.path = path
        self.folder = path + ".d"  # payloads larger than INLINE_LIMIT
        self.interval = interval
        self.max_pending = max_pending
        self._lock_fd: int | None = lock_fd
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # holds the WAL open: _keep_wal_on_close
        self._pending: list[Span] = []
        self._pending_tasks = 0
        self._pending_bytes = 0
        self._unsynced: list[str] = []  # result files written since the last commit
        self._files = 0  # result files written by this run (their names: _run_token-<n>)
        self._run_token = os.urandom(6).hex()
        self._spans: dict[int, tuple[Any, ...] | None] = {}  # span id -> its row, values read
        self._last_commit: float | None = None
        self._broken: CheckpointError | None = None
        self.stored_ok = 0  # results held when opened (after on_change)
        self.stored_failed = 0  # failures held when opened (after on_change)
        self.committed = 0  # tasks committed by this run
        self.reused_count = 0  # stored results handed out by lookup
        self.missing_files = 0  # lookups whose span's file was missing, damaged or unreadable
        self.function_changed = False
        self.change_message: str | None = None
        self.written_at: float | None = None  # when it was last committed to, before now

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        function: tuple[str, bytes],
        on_change: str = "keep",
        interval: float = 0.5,
        max_pending: int = 1_000_000,
    ) -> Journal:
        """Create or open the journal at ``path`` for ``function`` (``_keys.function_identity``).

        ``on_change`` says what to do when the journal was written for another version of the
        function: ``"keep"`` its results and forget its failures (they run again),
        ``"restart"`` from nothing, or ``"refuse"`` (``CheckpointError``). Either way,
        ``function_changed`` and ``change_message`` tell. Spans are committed by
        ``commit_due`` every ``interval`` seconds, or as soon as ``max_pending`` tasks wait.

        Raises ``CheckpointError`` when the journal is in use by another run, damaged, written
        by another version of multitrack, not a journal, not owned by you or writable by
        others, or in a read-only place; the file is then left as it is.

        Example:
            >>> import os, tempfile
            >>> path = os.path.join(tempfile.mkdtemp(), "run.sqlite")
            >>> Journal.open(path, function=("m:f", b"1" * 16)).close()
            >>> journal = Journal.open(path, function=("m:f", b"2" * 16))
            >>> journal.function_changed
            True
            >>> try:  # one run at a time
            ...     Journal.open(path, function=("m:f", b"2" * 16))
            ... except CheckpointError as err:
            ...     print(str(err).split(" (")[0])  # doctest: +ELLIPSIS
            checkpoint .../run.sqlite is in use by pid ... on host ...
            >>> journal.close()
        """
        if on_change not in ON_CHANGE:
            raise ValueError(f"on_change must be one of {', '.join(ON_CHANGE)}, not {on_change!r}")
        full = os.path.abspath(os.fspath(path))
        for companion, what in _companions(full):
            _refuse_untrusted(full, companion, what)
        journal = cls(full, _lock(full), interval=interval, max_pending=max_pending)
        try:
            journal._connect(function, on_change)
        except BaseException:
            journal._release()
            raise
        _open_journals.add(journal)
        return journal

    def _connect(self, function: tuple[str, bytes], on_change: str) -> None:
        _create_or_check_writable(self.path)
        # Read-only: a damaged file is refused untouched. The connection stays open until
        # close (see _keep_wal_on_close).
        self._reader, meta = _inspect(self.path)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(f"cannot be opened ({exc})") from exc
        self._conn = conn
        try:
            # A new journal is made without fsyncs (six of them, 2-40 ms on a busy disk): a
            # machine that loses power just then loses an empty journal. Then every commit
            # goes to the WAL, synced by checkpoints only.
            conn.execute("PRAGMA synchronous=OFF" if meta is None else "PRAGMA synchronous=NORMAL")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise self._error(f"cannot use SQLite's WAL mode here (got {mode!r})")
            if meta is None:
                conn.executescript(
                    f"BEGIN; {SCHEMA} PRAGMA application_id={APPLICATION_ID}; "
                    f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
                conn.execute("PRAGMA synchronous=NORMAL")
                meta = {}
            else:
                self._index()
            _keep_wal_on_close(conn, self._reader)
            self._apply_function(meta, function, on_change)
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "while opening it") from exc
        remove_files(self.folder, temporary_only=True)

    def _index(self) -> None:
        """Index the tasks of the spans the last run stored (``_journal_rows``)."""
        conn = self._db()
        if conn.execute("SELECT 1 FROM spans WHERE indexed = 0 LIMIT 1").fetchone() is None:
            return
        conn.execute("BEGIN")
        index_spans(conn)
        conn.execute("COMMIT")

    def _counts(self) -> tuple[int, int]:
        counts = dict(self._db().execute("SELECT ok, count(*) FROM tasks GROUP BY ok").fetchall())
        return counts.get(1, 0), counts.get(0, 0)

    def _apply_function(
        self, meta: dict[str, Any], function: tuple[str, bytes], on_change: str
    ) -> None:
        conn = self._db()
        ok, failed = self._counts()
        name, digest = function
        self.written_at = meta.get("updated", meta.get("opened"))
        old_name, old_digest = meta.get("function_name"), meta.get("function_digest")
        self.function_changed = old_name is not None and (old_name, old_digest) != (name, digest)
        if self.function_changed:
            self.change_message = self._describe_change(str(old_name), name, ok, failed, on_change)
            if on_change == "refuse":
                raise CheckpointError(self.change_message, path=self.path)
        conn.execute("BEGIN")
        if self.function_changed and on_change == "restart":
            conn.execute("DELETE FROM tasks")
            conn.execute("DELETE FROM spans")
            ok = failed = 0
        elif self.function_changed:
            conn.execute("DELETE FROM tasks WHERE ok = 0")
            conn.execute("DELETE FROM spans WHERE ok = 0")
            failed = 0
        now = time.time()
        rows = [("function_name", name), ("function_digest", digest), ("opened", now)]
        if not meta:
            rows += [("created", now), ("schema_version", SCHEMA_VERSION)]
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)
        conn.execute("COMMIT")
        if self.function_changed and on_change == "restart":
            remove_files(self.folder, temporary_only=False)
        self.stored_ok, self.stored_failed = ok, failed

    def _describe_change(
        self, old_name: str, name: str, ok: int, failed: int, on_change: str
    ) -> str:
        file = os.path.basename(self.path)
        when = ""
        if self.written_at is not None:
            when = time.strftime(" (%Y-%m-%d %H:%M)", time.localtime(float(self.written_at)))
        short, old_short = name.rpartition(":")[2], old_name.rpartition(":")[2]
        if old_name == name:
            head = f"checkpoint: {short} changed since {file} was written{when}"
        else:
            head = f"checkpoint: {file} was written{when} for {old_short}, not {short}"
        if on_change == "restart":
            return f"{head}; starting over: {ok + failed:,} stored tasks forgotten"
        if on_change == "refuse":
            return (
                f'{head}; not using it (on_change="refuse"): pass on_change="keep" to keep its '
                f'{ok:,} results, or "restart" to start over'
            )
        tail = f", running {_count(failed, 'failure')} again" if failed else ""
        return f"{head}; keeping {_count(ok, 'result')}{tail}"

    # -- reading --------------------------------------------------------------------------

    def lookup(self, key: bytes, occurrence: int = 0) -> Stored | None:
        """The stored outcome of the task with this key and occurrence number, or ``None``
        (never stored, or its span's file is missing or damaged, or its values no longer
        unpickle: it runs again). Only what earlier runs stored is looked up: a journal
        empty when opened costs no query."""
        if not (self.stored_ok or self.stored_failed):
            return None  # a new journal: no query per task
        try:
            row = self._db().execute(f"{_TASK} WHERE key = ? AND occurrence = ?", (key, occurrence))
            found = row.fetchone()
            stored = None if found is None else self._stored(found)
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "while reading it") from exc
        if stored is not None and stored.ok:
            self.reused_count += 1
        return stored

    def failures(self) -> list[Stored]:
        """Every failure the journal held when it was opened, in input order."""
        return [stored for stored in self if not stored.ok]

    def __iter__(self) -> Iterator[Stored]:
        """Every task the journal held when it was opened, in input order."""
        try:
            rows = self._db().execute(f"{_TASK} ORDER BY idx, occurrence").fetchall()
            for row in rows:
                stored = self._stored(row)
                if stored is not None:
                    yield stored
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "while reading it") from exc

    def _stored(self, task: tuple[Any, ...]) -> Stored | None:
        key, occurrence, index, ok, span_id, position = task
        span = self._span(span_id)
        if span is None:
            self.missing_files += 1
            return None
        values, error_type, message, traceback, pickled, seconds, attempts, finished = span
        value = None
        if ok:
            if not isinstance(values, list) or position >= len(values):
                self.missing_files += 1
                return None
            value = values[position]
        return Stored(
            key, occurrence, index, bool(ok), value,
            error_type, message, traceback, pickled, seconds, attempts, finished,
        )  # fmt: skip

    def _span(self, span_id: int) -> tuple[Any, ...] | None:
        """A span's row with its values unpickled (``None``: they cannot be read), kept for
        the lookups of its other tasks, which mostly come next."""
        if span_id in self._spans:
            return self._spans[span_id]
        row = self._db().execute(_SPAN, (span_id,)).fetchone()
        span = None
        if row is not None:
            ok, payload, file, size, digest, *rest = row
            if file is not None:
                payload = read_file(self.folder, file, size, digest)
            values = None
            if ok and payload is not None:
                try:
                    values = pickle.loads(payload)
                except Exception:  # it no longer unpickles (a class changed): run it again
                    values = None
            span = None if ok and values is None else (values, *rest)
        if len(self._spans) >= _SPANS_KEPT:
            del self._spans[next(iter(self._spans))]
        self._spans[span_id] = span
        return span

    # -- writing --------------------------------------------------------------------------

    def record_span(
        self,
        indices: Sequence[int],
        payload: bytes,
        *,
        args: bytes | None = None,
        keys: bytes | None = None,
        occurrences: bytes | None = None,
        skip: Sequence[int] = (),
        seconds: float,
    ) -> None:
        """Store, at the next commit, the results of tasks ``indices``: ``payload`` is the
        pickled list of their values, one per task, where the positions ``skip`` failed (their
        entries are placeholders). ``args`` (the arguments, ``plain_pickle``d) or ``keys``
        (16 bytes a task, and their occurrence numbers as 8-byte integers, or ``None`` when
        numbered on indexing) name the tasks; ``seconds``: each one's time."""
        if self._broken is not None:
            raise self._broken
        file = None
        if in_a_file(payload, len(indices) - len(skip)):
            file, inline = self._write_file(payload), None
        else:
            inline = payload
            self._pending_bytes += len(payload) + len(args or b"") + len(keys or b"")
        span = Span(indices, args, keys, occurrences, skip, inline, file, None, seconds, 1, 0.0)
        self._buffer(span)

    def record_failure(
        self,
        index: int,
        *,
        args: bytes | None = None,
        key: bytes | None = None,
        occurrence: int | None = None,
        type_name: str,
        message: str,
        traceback: str,
        pickled: bytes | None = None,
        seconds: float,
        attempts: int,
    ) -> None:
        """Store a task's final failure (its exception as text, and pickled when it could
        be) at the next commit, named as in ``record_span``."""
        if self._broken is not None:
            raise self._broken
        numbers = None if occurrence is None else occurrence.to_bytes(8, "little", signed=True)
        error = (type_name, message, traceback, pickled)
        self._pending_bytes += len(traceback) + len(pickled or b"")
        self._buffer(Span([index], args, key, numbers, (), None, None, error, seconds, attempts, 0))

    def _buffer(self, span: Span) -> None:
        span.finished = time.time()
        self._pending.append(span)
        self._pending_tasks += span.stored_tasks()

    def commit_due(self, now: float) -> bool:
        """Commit when ``interval`` seconds (of the caller's clock) passed since the last
        commit, or when many tasks wait; call it once per scheduler step. Whether it did."""
        if self._last_commit is None:
            self._last_commit = now
        if not self._pending:
            return False
        if (
            now - self._last_commit >= self.interval
            or self._pending_tasks >= self.max_pending
            or self._pending_bytes >= _MAX_PENDING_BYTES
        ):
            self.commit()
            self._last_commit = now
            return True
        return False

    def commit(self) -> None:
        """Make every span recorded so far durable: result files first, then the rows."""
        if self._broken is not None:
            raise self._broken
        if not self._pending:
            return
        spans, files, tasks = self._pending, self._unsynced, self._pending_tasks
        self._pending, self._unsynced, self._pending_bytes, self._pending_tasks = [], [], 0, 0
        conn = self._db()
        try:
            for name in files:
                _fsync(os.path.join(self.folder, name))
            if files:
                _fsync(self.folder)
            conn.execute("BEGIN")
            conn.executemany(INSERT_SPAN, [span.row() for span in spans])
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('updated', ?)", (time.time(),))
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            error = self._storage_error(exc, f"while storing {tasks:,} results")
            self._broken = error
            raise error from exc
        self.committed += tasks

    def close(self) -> None:
        """Commit what is pending (unless an earlier error stopped the journal) and release
        the lock. Safe to call twice."""
        try:
            if self._conn is not None and self._broken is None:
                self.commit()
                self._trim_wal()
        finally:
            self._release()

    def _trim_wal(self) -> None:
        """Copy a large WAL into the database and empty it. Closing leaves the WAL as it is
        (``_keep_wal_on_close``), and the next open's recovery counts every frame in it as not
        yet copied: SQLite then never starts it over, and each open added its commits to it
        (a script of 1,000 checkpointed calls: a 9.5 MB WAL that every open read through,
        75 -> 308 ms a call). Past ``WAL_LIMIT`` a close pays one checkpoint (two fsyncs)."""
        try:
            if os.path.getsize(self.path + "-wal") > WAL_LIMIT:
                self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except (OSError, sqlite3.Error):  # the data is safe in the WAL: the next close tries
            pass

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CheckpointError(f"checkpoint {self.path} is closed", path=self.path)
        return self._conn

    def _release(self) -> None:
        _open_journals.discard(self)
        conn, self._conn = self._conn, None
        reader, self._reader = self._reader, None
        try:
            try:
                if conn is not None:
                    conn.close()  # the writer first: the reader keeps the WAL (see below)
            finally:
                if reader is not None:
                    reader.close()
        finally:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                try:
                    os.ftruncate(fd, 0)
                    # Unlocked explicitly: closing releases a flock only once every copy of
                    # the descriptor is closed, and a child forked a moment ago may not have
                    # closed its copy yet (its at-fork handler does).
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except OSError:
                    pass
                os.close(fd)

    def _write_file(self, payload: bytes) -> tuple[str, int, bytes]:
        """Write a large payload beside the journal; fsync'd at the next commit."""
        self._files += 1
        name = f"{self._run_token}-{self._files}.pkl"
        try:
            file = write_file(self.folder, name, payload)
        except OSError as exc:
            error = self._storage_error(exc, f"while writing {os.path.join(self.folder, name)}")
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._broken = error
            raise error from exc
        self._unsynced.append(name)
        return file

    def _error(self, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path} {why}", path=self.path)

    def _storage_error(self, exc: BaseException, doing: str) -> CheckpointError:
        full = getattr(exc, "sqlite_errorcode", None) == getattr(sqlite3, "SQLITE_FULL", 13)
        full = full or "disk is full" in str(exc)
        full = full or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
        if full:
            return self._error(
                f": the disk is full ({doing}). The {self.committed:,} results committed "
                "before by this run are kept, and so is everything stored earlier; what was "
                "not stored runs again next time. Free some space and run again."
            )
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return self._error(f"is damaged ({exc}, {doing})")
        return self._error(f"failed {doing}: {exc}")


# -- opening, before a connection exists --------------------------------------------------


def _count(n: int, noun: str) -> str:
    """``"1 result"``, ``"9,812 results"``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _companions(path: str) -> list[tuple[str, str]]:
    return [
        (path, "the journal"),
        (path + "-wal", "the journal's -wal file"),
        (path + "-shm", "the journal's -shm file"),
        (path + ".d", "the journal's result folder"),
        (path + ".lock", "the journal's lock file"),
    ]


def _refuse_untrusted(journal: str, path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {journal}: cannot read {path}: {exc}", path=journal
        ) from exc
    why = (
        "a journal holds pickles and loading a pickle runs code, so multitrack opens only a "
        "journal that you own and that nobody else can write"
    )
    me = os.geteuid()
    if st.st_uid != me:
        raise CheckpointError(
            f"checkpoint {journal}: {what} ({path}) belongs to uid {st.st_uid}, not to you "
            f"(uid {me}); {why}",
            path=journal,
        )
    if st.st_mode & 0o022:
        raise CheckpointError(
            f"checkpoint {journal}: {what} ({path}) can be written by group or others (mode "
            f"{st.st_mode & 0o777:o}); {why}. If its content is yours: chmod go-w {path}",
            path=journal,
        )


def _lock(path: str) -> int:
    """Hold ``path.lock`` with flock for the journal's life; refuse when another holds it."""
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path}: cannot create its lock file {lock_path} ({exc.strerror}); the "
            "journal needs a folder it can write in",
            path=path,
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CheckpointError(
                f"checkpoint {path}: cannot lock {lock_path}: {exc}", path=path
            ) from exc
        who = f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another run"
        raise CheckpointError(
            f"checkpoint {path} is in use by {who} (it holds {lock_path}); one run at a time "
            "can write a journal: wait for it, or pass another path",
            path=path,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def _create_or_check_writable(path: str) -> None:
    """Create the journal readable by its owner only (SQLite gives -wal and -shm the same
    mode), or check that the existing one can be written, before SQLite touches it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except IsADirectoryError as exc:
        raise CheckpointError(f"checkpoint {path} is a folder, not a file", path=path) from exc
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be written ({exc.strerror}); pass a path in a writable "
            "folder",
            path=path,
        ) from exc
    os.close(fd)


def _inspect(path: str) -> tuple[sqlite3.Connection, dict[str, Any] | None]:
    """A read-only connection to the journal, and its meta table (``None``: an empty file).
    Read through a read-only connection so that a file that turns out damaged, of another
    version or foreign is left exactly as it was; the connection is closed when it is
    refused, else the caller keeps it (``_keep_wal_on_close``)."""
    uri = "file:" + _uri_path(path) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise CheckpointError(f"checkpoint {path} cannot be opened ({exc})", path=path) from exc
    try:
        app = conn.execute("PRAGMA application_id").fetchall()[0][0]
        version = conn.execute("PRAGMA user_version").fetchall()[0][0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if app == 0 and not tables:
            return conn, None
        if app != APPLICATION_ID:
            raise CheckpointError(
                f"checkpoint {path} is a SQLite database but not a multitrack journal; it was "
                "left as it is: pass another path",
                path=path,
            )
        if version != SCHEMA_VERSION:
            raise CheckpointError(_other_version(path, version), path=path)
        conn.execute("SELECT count(*) FROM spans").fetchall()  # reads its pages: damaged?
        conn.execute("SELECT count(*) FROM tasks").fetchall()
        return conn, dict(conn.execute("SELECT name, value FROM meta").fetchall())
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.DatabaseError):
            raise CheckpointError(
                f"checkpoint {path} is damaged or not a SQLite database ({exc}); it was left "
                "as it is: move it away, or pass another path",
                path=path,
            ) from exc
        raise


def _uri_path(path: str) -> str:
    """``path`` for a ``file:`` URI: SQLite decodes ``%HH``, and ``?`` and ``#`` end the
    path (pathlib's ``as_uri`` would do, at 4 ms of imports on a first call)."""
    return "".join(f"%{ord(c):02x}" if c in "%?#" else c for c in path)


def _other_version(path: str, version: int) -> str:
    """Journals of another format are refused untouched, not converted: version 1 (a row per
    task) was never in a release, and a converter would be code kept for nobody."""
    if version > SCHEMA_VERSION:
        return (
            f"checkpoint {path} was written by a newer multitrack (journal version {version}; "
            f"this multitrack reads version {SCHEMA_VERSION}); it was left as it is: upgrade "
            "multitrack, or pass another path"
        )
    return (
        f"checkpoint {path} was written by an older multitrack (journal version {version}; "
        f"this multitrack reads version {SCHEMA_VERSION}); it was left as it is: finish that "
        "run with the multitrack that wrote it, or pass another path"
    )


def _keep_wal_on_close(writer: sqlite3.Connection, reader: sqlite3.Connection | None) -> None:
    """Closing leaves the WAL as it is instead of copying it into the database: that copy
    (a checkpoint on close) costs two fsyncs, 5-20 ms at the end of every call. The next open
    reads the WAL, and SQLite checkpoints by itself once it holds 1,000 pages; a commit is as
    safe in the WAL as in the database (``synchronous=NORMAL`` syncs neither).

    Python 3.12+ says so with ``SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE``. Earlier versions cannot,
    so the journal keeps its read-only ``reader`` open, reading the database in WAL mode
    (which holds a shared lock on it until closed), and closes it after the writer: the
    writer is then not the last connection, and a last connection that is read-only cannot
    checkpoint (SQLite's wal.c returns ``SQLITE_READONLY``), so neither copies anything."""
    option = getattr(sqlite3, "SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE", None)
    if option is not None:
        writer.setconfig(option, True)  # type: ignore[attr-defined]
    if reader is not None:
        reader.execute("SELECT count(*) FROM sqlite_master").fetchall()  # now in WAL mode


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A forked child (a process-backend worker) must not keep the journal locked after its parent
# is gone: it closes its copy of the lock's descriptor (the parent's lock stays: a flock lock
# belongs to the open file, not to one descriptor). It leaves the inherited connection alone
# (SQLite connections must not be used across a fork) and never writes.
_open_journals: weakref.WeakSet[Journal] = weakref.WeakSet()


def _forget_journals_in_child() -> None:
    for journal in list(_open_journals):
        fd, journal._lock_fd = journal._lock_fd, None
        journal._broken = CheckpointError(
            f"checkpoint {journal.path} belongs to the parent process", path=journal.path
        )
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _open_journals.clear()


os.register_at_fork(after_in_child=_forget_journals_in_child)
