"""The checkpoint journal: finished tasks stored as they arrive, so a rerun runs only what is
missing (``checkpoint="run.sqlite"``).

::

    scheduler (the parent, the only writer)
      │ lookup(key, occurrence) ──▶ SELECT one row ──▶ Stored | None  (result file read back)
      │ record_result / record_failure ──▶ rows buffered in memory; payloads > 64 KiB written
      │                                    at once to run.sqlite.d/<key>-<occurrence>.pkl
      │ commit_due(now) ─ every `interval` s or `max_pending` rows ─▶ commit():
      │       fsync the new result files and their folder, then one transaction for the rows
      ▼ close() ──▶ last commit, lock released
    run.sqlite (+ -wal, -shm)   run.sqlite.lock (flock, "pid host")   run.sqlite.d/ (0o700)

Why it is shaped so (research notes, section 1):

* **One writer, no thread.** Only the parent writes, from its scheduler loop; workers never
  open the journal. SQLite in WAL mode with ``synchronous=NORMAL``: a commit survives the
  process being killed, and only a power loss can take back the last ones. A SIGKILL loses at
  most the rows of the last ``interval`` seconds; those tasks simply run again.
* **Nothing stored is lost, nothing wrong is returned.** A result file is fsync'd and renamed
  into place before the row naming it is committed, and its size and digest are checked when
  it is read back: a missing or truncated file means "not stored" (the task runs again), never
  an error that loses the rest. A full disk raises ``CheckpointError`` after keeping every
  commit before it. A damaged file, a journal written by a newer multitrack, or a SQLite file
  that is not a journal is refused *without being touched* (it is inspected through a
  read-only connection first).
* **One run at a time.** ``run.sqlite.lock`` is held with ``flock`` for the journal's life,
  so a second run on the same journal (here or in another process) is refused with the
  holder's pid and host; the lock vanishes with its process, so a killed run never blocks the
  next one. Forked children drop their copy of the lock's descriptor.
* **Trusted like code.** A journal holds pickles, and loading a pickle runs code: only a
  journal, companion files and result folder owned by the current user and not writable by
  group or others is opened, and everything is created readable by its owner only.

The caller passes bytes (the result as pickled) and keys (``_keys``); nothing here pickles.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pathlib
import socket
import sqlite3
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from multitrack._errors import CheckpointError

__all__ = ["INLINE_LIMIT", "ON_CHANGE", "SCHEMA_VERSION", "Journal", "Stored"]

SCHEMA_VERSION = 1
APPLICATION_ID = 0x4D54524B  # "MTRK": tells a journal from any other SQLite file
INLINE_LIMIT = 64 * 1024  # larger results go to files (SQLite is faster below ~100 KB)
ON_CHANGE = ("keep", "restart", "refuse")
_MAX_PENDING_BYTES = 32 << 20  # inline payloads waiting for a commit

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value);
CREATE TABLE tasks (
    key BLOB NOT NULL, occurrence INTEGER NOT NULL, idx INTEGER NOT NULL, ok INTEGER NOT NULL,
    payload BLOB, file TEXT, size INTEGER, digest BLOB,
    error_type TEXT, error_message TEXT, error_traceback TEXT, error_pickle BLOB,
    seconds REAL NOT NULL, attempts INTEGER NOT NULL, finished REAL NOT NULL
);
CREATE UNIQUE INDEX tasks_by_key ON tasks (key, occurrence);
"""
_COLUMNS = (
    "key, occurrence, idx, ok, payload, file, size, digest, error_type, error_message, "
    "error_traceback, error_pickle, seconds, attempts, finished"
)
_INSERT = f"INSERT OR REPLACE INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 15)})"


@dataclass(slots=True)  # not frozen: a frozen dataclass costs microseconds per lookup
class Stored:
    """One task as the journal holds it: a result (``ok``, ``payload`` as pickled) or a
    failure (``error_type``, ``error_message``, ``error_traceback``, ``error_pickle``)."""

    key: bytes
    occurrence: int
    index: int
    ok: bool
    payload: bytes | None
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
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "run.sqlite")
        >>> fn = ("mymod:resize_one", b"0" * 16)
        >>> with Journal.open(path, function=fn) as journal:
        ...     journal.record_result(b"k" * 16, 0, 0, b"pickled result", seconds=0.1, attempts=1)
        >>> with Journal.open(path, function=fn) as journal:
        ...     journal.lookup(b"k" * 16, 0).payload, journal.reused_count
        (b'pickled result', 1)
    """

    def __init__(self, path: str, lock_fd: int, *, interval: float, max_pending: int) -> None:
        self.path = path
        self.folder = path + ".d"  # results larger than INLINE_LIMIT
        self.interval = interval
        self.max_pending = max_pending
        self._lock_fd: int | None = lock_fd
        self._conn: sqlite3.Connection | None = None
        self._pending: list[tuple[Any, ...]] = []
        self._pending_bytes = 0
        self._unsynced: list[str] = []  # result files written since the last commit
        self._last_commit: float | None = None
        self._broken: CheckpointError | None = None
        self.stored_ok = 0  # results held when opened (after on_change)
        self.stored_failed = 0  # failures held when opened (after on_change)
        self.committed = 0  # rows committed by this run
        self.reused_count = 0  # stored results handed out by lookup
        self.missing_files = 0  # rows whose result file was missing or damaged
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
        max_pending: int = 10_000,
    ) -> Journal:
        """Create or open the journal at ``path`` for ``function`` (``_keys.function_identity``).

        ``on_change`` says what to do when the journal was written for another version of the
        function: ``"keep"`` its results and forget its failures (they run again),
        ``"restart"`` from nothing, or ``"refuse"`` (``CheckpointError``). Either way,
        ``function_changed`` and ``change_message`` tell. Rows are committed by
        ``commit_due`` every ``interval`` seconds, or as soon as ``max_pending`` rows wait.

        Raises ``CheckpointError`` when the journal is in use by another run, damaged, written
        by a newer multitrack, not a journal, not owned by you or writable by others, or in a
        read-only place; the file is then left as it is.

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
        facts = _inspect(self.path)  # read-only: a damaged file is refused untouched
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._error(f"cannot be opened ({exc})") from exc
        self._conn = conn
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise self._error(f"cannot use SQLite's WAL mode here (got {mode!r})")
            conn.execute("PRAGMA synchronous=NORMAL")
            if facts is None:
                conn.executescript(
                    f"BEGIN; {_SCHEMA} PRAGMA application_id={APPLICATION_ID}; "
                    f"PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
                )
                facts = {"meta": {}, "ok": 0, "failed": 0}
            self._apply_function(facts, function, on_change)
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "while opening it") from exc
        self._remove_temporary_files()

    def _apply_function(
        self, facts: dict[str, Any], function: tuple[str, bytes], on_change: str
    ) -> None:
        assert self._conn is not None
        meta, ok, failed = facts["meta"], facts["ok"], facts["failed"]
        name, digest = function
        self.written_at = meta.get("updated", meta.get("opened"))
        old_name, old_digest = meta.get("function_name"), meta.get("function_digest")
        self.function_changed = old_name is not None and (old_name, old_digest) != (name, digest)
        if self.function_changed:
            self.change_message = self._describe_change(old_name, name, ok, failed, on_change)
            if on_change == "refuse":
                raise CheckpointError(self.change_message, path=self.path)
        conn = self._conn
        conn.execute("BEGIN")
        if self.function_changed and on_change == "restart":
            conn.execute("DELETE FROM tasks")
            ok = failed = 0
        elif self.function_changed:
            conn.execute("DELETE FROM tasks WHERE ok = 0")
            failed = 0
        now = time.time()
        rows = [("function_name", name), ("function_digest", digest), ("opened", now)]
        if not meta:
            rows += [("created", now), ("schema_version", SCHEMA_VERSION)]
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)
        conn.execute("COMMIT")
        if self.function_changed and on_change == "restart":
            self._remove_result_files()
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
        (never stored, or its result file is missing or damaged: it runs again). Only what
        earlier runs stored is looked up: a journal empty when opened costs no query."""
        if not (self.stored_ok or self.stored_failed):
            return None  # a new journal: no query per task
        try:
            row = (
                self._db()
                .execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE key = ? AND occurrence = ?",
                    (key, occurrence),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "while reading it") from exc
        if row is None:
            return None
        stored = self._stored(row)
        if stored is not None and stored.ok:
            self.reused_count += 1
        return stored

    def failures(self) -> list[Stored]:
        """Every failure the journal holds (this run's included), in input order."""
        self.commit()
        try:
            rows = self._db().execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE ok = 0 ORDER BY idx, occurrence"
            )
            return [stored for stored in map(self._stored, rows) if stored is not None]
        except sqlite3.Error as exc:
            raise self._storage_error(exc, "while reading it") from exc

    def __iter__(self) -> Iterator[Stored]:
        """Every task stored (committed), in input order."""
        rows = self._db().execute(f"SELECT {_COLUMNS} FROM tasks ORDER BY idx, occurrence")
        for row in rows:
            stored = self._stored(row)
            if stored is not None:
                yield stored

    def _stored(self, row: tuple[Any, ...]) -> Stored | None:
        key, occurrence, index, ok, payload, file, size, digest = row[:8]
        error_type, error_message, error_traceback, error_pickle, seconds, attempts, at = row[8:]
        if file is not None:
            payload = self._read_file(file, size, digest)
            if payload is None:
                self.missing_files += 1
                return None
        return Stored(
            key,
            occurrence,
            index,
            bool(ok),
            payload,
            error_type,
            error_message,
            error_traceback,
            error_pickle,
            seconds,
            attempts,
            at,
        )

    def _read_file(self, name: str, size: int, digest: bytes) -> bytes | None:
        try:
            with open(os.path.join(self.folder, name), "rb") as file:
                data = file.read(size + 1)
        except OSError:
            return None
        if len(data) != size or hashlib.blake2b(data, digest_size=16).digest() != digest:
            return None
        return data

    # -- writing --------------------------------------------------------------------------

    def record_result(
        self,
        key: bytes,
        occurrence: int,
        index: int,
        payload: bytes,
        *,
        seconds: float,
        attempts: int,
    ) -> None:
        """Store a task's result (``payload``: the result as pickled) at the next commit."""
        file: str | None = None
        size: int | None = None
        digest: bytes | None = None
        inline: bytes | None = payload
        if len(payload) > INLINE_LIMIT:
            file, size, inline = self._write_file(key, occurrence, payload), len(payload), None
            digest = hashlib.blake2b(payload, digest_size=16).digest()
        else:
            self._pending_bytes += len(payload)
        row = (key, occurrence, index, 1, inline, file, size, digest, None, None, None, None)
        self._buffer((*row, seconds, attempts, time.time()))

    def record_failure(
        self,
        key: bytes,
        occurrence: int,
        index: int,
        *,
        type_name: str,
        message: str,
        traceback: str,
        pickled: bytes | None = None,
        seconds: float,
        attempts: int,
    ) -> None:
        """Store a task's final failure (its exception as text, and pickled when it could
        be) at the next commit."""
        error = (type_name, message, traceback, pickled)
        row = (key, occurrence, index, 0, None, None, None, None, *error)
        self._pending_bytes += len(traceback) + len(pickled or b"")
        self._buffer((*row, seconds, attempts, time.time()))

    def _buffer(self, row: tuple[Any, ...]) -> None:
        if self._broken is not None:
            raise self._broken
        self._pending.append(row)

    def commit_due(self, now: float) -> bool:
        """Commit when ``interval`` seconds (of the caller's clock) passed since the last
        commit, or when many rows wait; call it once per scheduler step. Whether it did."""
        if self._last_commit is None:
            self._last_commit = now
        if not self._pending:
            return False
        if (
            now - self._last_commit >= self.interval
            or len(self._pending) >= self.max_pending
            or self._pending_bytes >= _MAX_PENDING_BYTES
        ):
            self.commit()
            self._last_commit = now
            return True
        return False

    def commit(self) -> None:
        """Make every row recorded so far durable: result files first, then the rows."""
        if self._broken is not None:
            raise self._broken
        if not self._pending:
            return
        rows, files = self._pending, self._unsynced
        self._pending, self._unsynced, self._pending_bytes = [], [], 0
        conn = self._db()
        try:
            for name in files:
                _fsync(os.path.join(self.folder, name))
            if files:
                _fsync(self.folder)
            conn.execute("BEGIN")
            conn.executemany(_INSERT, rows)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('updated', ?)", (time.time(),))
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            error = self._storage_error(exc, f"while storing {len(rows):,} results")
            self._broken = error
            raise error from exc
        self.committed += len(rows)

    def close(self) -> None:
        """Commit what is pending (unless an earlier error stopped the journal) and release
        the lock. Safe to call twice."""
        try:
            if self._conn is not None and self._broken is None:
                self.commit()
        finally:
            self._release()

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
        try:
            if conn is not None:
                conn.close()
        finally:
            fd, self._lock_fd = self._lock_fd, None
            if fd is not None:
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
                os.close(fd)  # releases the flock

    def _write_file(self, key: bytes, occurrence: int, payload: bytes) -> str:
        """Write a large result beside the journal; fsync'd at the next commit."""
        if self._broken is not None:
            raise self._broken
        name = f"{key.hex()}-{occurrence}.pkl"
        final = os.path.join(self.folder, name)
        temporary = os.path.join(self.folder, f".tmp-{name}")
        try:
            try:
                os.mkdir(self.folder, 0o700)
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
        except OSError as exc:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            error = self._storage_error(exc, f"while writing {final}")
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                self._broken = error
            raise error from exc
        self._unsynced.append(name)
        return name

    def _remove_temporary_files(self) -> None:
        """Files left half-written by a run that was killed (we hold the lock: none is live)."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if name.startswith(".tmp-"):
                try:
                    os.unlink(os.path.join(self.folder, name))
                except OSError:
                    pass

    def _remove_result_files(self) -> None:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if name.endswith(".pkl"):
                try:
                    os.unlink(os.path.join(self.folder, name))
                except OSError:
                    pass

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


def _inspect(path: str) -> dict[str, Any] | None:
    """What an existing journal holds, read through a read-only connection so that a file
    that turns out damaged, newer or foreign is left exactly as it was. ``None``: empty."""
    uri = pathlib.Path(path).as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as exc:
        raise CheckpointError(f"checkpoint {path} cannot be opened ({exc})", path=path) from exc
    try:
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if app == 0 and not tables:
            return None
        if app != APPLICATION_ID:
            raise CheckpointError(
                f"checkpoint {path} is a SQLite database but not a multitrack journal; it was "
                "left as it is: pass another path",
                path=path,
            )
        if version > SCHEMA_VERSION:
            raise CheckpointError(
                f"checkpoint {path} was written by a newer multitrack (journal version "
                f"{version}; this multitrack reads up to version {SCHEMA_VERSION}); it was "
                "left as it is: upgrade multitrack, or pass another path",
                path=path,
            )
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        counts = dict(conn.execute("SELECT ok, count(*) FROM tasks GROUP BY ok").fetchall())
        return {"meta": meta, "ok": counts.get(1, 0), "failed": counts.get(0, 0)}
    except sqlite3.DatabaseError as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged or not a SQLite database ({exc}); it was left as it "
            "is: move it away, or pass another path",
            path=path,
        ) from exc
    finally:
        conn.close()


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
