"""The checkpoint journal (``_checkpoint``): what it stores comes back, a bad journal (busy,
damaged, newer, foreign, not yours, read-only, on a full disk) is refused with a message that
names it and is never modified, a killed writer loses at most its last commit interval, and
a changed function is told and handled as ``on_change`` says."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from multitrack import _checkpoint
from multitrack._checkpoint import INLINE_LIMIT, SCHEMA_VERSION, Journal
from multitrack._errors import CheckpointError, MultitrackError
from multitrack._keys import task_key

FN = ("jobs:resize_one", b"1" * 16)
FN_EDITED = ("jobs:resize_one", b"2" * 16)


def key(i: int) -> bytes:
    k = task_key(i)
    assert k is not None
    return k


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record(
    journal: Journal, k: bytes, occurrence: int, index: int, value: object, seconds: float = 0.0
) -> None:
    """One task's result, as a run that keyed its tasks stores it (a span of one)."""
    journal.record_span(
        [index],
        pickle.dumps([value]),
        keys=k,
        occurrences=occurrence.to_bytes(8, "little"),
        seconds=seconds,
    )


def fill(path: Path, ok: int, failed: int = 0, function: tuple[str, bytes] = FN) -> None:
    with Journal.open(path, function=function) as journal:
        for i in range(ok):
            record(journal, key(i), 0, i, b"result %d" % i, seconds=0.5)
        for i in range(ok, ok + failed):
            journal.record_failure(
                i,
                key=key(i),
                occurrence=0,
                type_name="ValueError",
                message=f"bad {i}",
                traceback="Traceback ...\nValueError: bad",
                seconds=0.1,
                attempts=2,
            )


def result_files(path: Path) -> list[Path]:
    """The result files beside a journal, in the order they were written."""
    files = (path.parent / (path.name + ".d")).glob("*.pkl")
    return sorted(files, key=lambda f: int(f.stem.rpartition("-")[2]))


# -- storing and reading back ---------------------------------------------------------------


def test_results_and_failures_come_back(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=3, failed=2)
    with Journal.open(path, function=FN) as journal:
        assert (journal.stored_ok, journal.stored_failed) == (3, 2)
        assert not journal.function_changed and journal.change_message is None
        stored = journal.lookup(key(1))
        assert stored is not None and stored.ok and stored.value == b"result 1"
        assert (stored.index, stored.attempts, stored.seconds) == (1, 1, 0.5)
        assert stored.finished == pytest.approx(time.time(), abs=60)
        failure = journal.lookup(key(4))
        assert failure is not None and not failure.ok and failure.value is None
        assert (failure.error_type, failure.error_message) == ("ValueError", "bad 4")
        assert journal.lookup(key(99)) is None
        assert journal.lookup(key(1), occurrence=1) is None
        assert journal.reused_count == 1  # failures are not reused results
        assert [f.index for f in journal.failures()] == [3, 4]
        assert [s.index for s in journal] == [0, 1, 2, 3, 4]


def test_a_journal_opened_again_and_again_keeps_its_wal_small(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each close leaves the WAL (no checkpoint on close), and the next open's recovery counts
    # all of it as not yet copied, so SQLite never starts it over: every open added to it.
    monkeypatch.setattr(_checkpoint, "WAL_LIMIT", 64 << 10)
    path = tmp_path / "run.sqlite"
    wal = tmp_path / "run.sqlite-wal"
    sizes = []
    for i in range(60):
        with Journal.open(path, function=FN) as journal:
            record(journal, key(i), 0, i, b"result %d" % i)
        sizes.append(wal.stat().st_size if wal.exists() else 0)
    assert max(sizes) < 2 * (64 << 10) + 32 * 4096, sizes  # the limit, and one open's commits
    with Journal.open(path, function=FN) as journal:
        assert journal.stored_ok == 60  # all copied into the database, none lost


def test_equal_inputs_are_separate_tasks(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    with Journal.open(path, function=FN) as journal:
        record(journal, key(7), 0, 0, b"first draw")
        record(journal, key(7), 1, 5, b"second draw")
    with Journal.open(path, function=FN) as journal:
        assert journal.lookup(key(7), 0).value == b"first draw"  # type: ignore[union-attr]
        assert journal.lookup(key(7), 1).value == b"second draw"  # type: ignore[union-attr]
        assert journal.lookup(key(7), 2) is None


def test_a_rerun_failure_is_replaced_by_its_result(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=0, failed=1)
    with Journal.open(path, function=FN) as journal:
        record(journal, key(0), 0, 0, b"fixed")
    with Journal.open(path, function=FN) as journal:
        assert journal.lookup(key(0)).ok  # type: ignore[union-attr]
        assert journal.failures() == []


def test_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    os.umask(0o022)
    path = tmp_path / "run.sqlite"
    with Journal.open(path, function=FN) as journal:
        record(journal, key(0), 0, 0, b"x" * (INLINE_LIMIT + 1))
        journal.commit()
        for name in ["run.sqlite", "run.sqlite-wal", "run.sqlite-shm", "run.sqlite.lock"]:
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
        assert (tmp_path / "run.sqlite.d").stat().st_mode & 0o777 == 0o700
        (result,) = (tmp_path / "run.sqlite.d").iterdir()
        assert result.stat().st_mode & 0o777 == 0o600


# -- large results in files -----------------------------------------------------------------


def test_large_results_go_to_files_and_come_back(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    big = os.urandom(INLINE_LIMIT + 1)
    with Journal.open(path, function=FN) as journal:
        record(journal, key(0), 0, 0, big)
        record(journal, key(1), 0, 1, b"small")
    files = list((tmp_path / "run.sqlite.d").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pkl"
    assert path.stat().st_size < INLINE_LIMIT  # not inline
    with Journal.open(path, function=FN) as journal:
        assert journal.lookup(key(0)).value == big  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["deleted", "truncated", "altered"])
def test_a_missing_or_damaged_result_file_means_not_stored(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "run.sqlite"
    with Journal.open(path, function=FN) as journal:
        for i in range(3):
            record(journal, key(i), 0, i, bytes([i]) * (INLINE_LIMIT + 10))
    victim = result_files(path)[1]
    if damage == "deleted":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:100])
    else:
        data = bytearray(victim.read_bytes())
        data[5] ^= 0xFF
        victim.write_bytes(bytes(data))
    with Journal.open(path, function=FN) as journal:
        assert journal.lookup(key(1)) is None  # runs again
        assert journal.missing_files == 1
        assert journal.lookup(key(0)).value == bytes([0]) * (INLINE_LIMIT + 10)  # type: ignore[union-attr]
        assert journal.lookup(key(2)) is not None
        # stored again, it comes back
        record(journal, key(1), 0, 1, b"again" * 20_000)
    with Journal.open(path, function=FN) as journal:
        assert journal.lookup(key(1)).value == b"again" * 20_000  # type: ignore[union-attr]


def test_half_written_result_files_are_removed_on_open(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=1)
    folder = tmp_path / "run.sqlite.d"
    folder.mkdir(mode=0o700)
    (folder / ".tmp-abc-0.pkl").write_bytes(b"half")
    Journal.open(path, function=FN).close()
    assert list(folder.iterdir()) == []


# -- one run at a time ----------------------------------------------------------------------


def test_a_second_open_in_this_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    with Journal.open(path, function=FN):
        with pytest.raises(CheckpointError) as caught:
            Journal.open(path, function=FN)
        message = str(caught.value)
        assert str(path) in message
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert caught.value.path == str(path)
    Journal.open(path, function=FN).close()  # free again once closed


HOLDER = textwrap.dedent(
    """
    import sys, time
    from multitrack._checkpoint import Journal
    journal = Journal.open(sys.argv[1], function=("jobs:resize_one", b"1" * 16))
    print("holding", flush=True)
    time.sleep(60)
    """
)


def test_a_journal_held_by_another_process_is_refused_until_it_dies(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(CheckpointError, match=f"in use by pid {holder.pid} on host"):
            Journal.open(path, function=FN)
    finally:
        holder.kill()  # a killed holder leaves no lock behind
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    Journal.open(path, function=FN).close()


def test_a_forked_child_does_not_keep_the_journal_locked(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    journal = Journal.open(path, function=FN)
    pid = os.fork()
    if pid == 0:  # the child outlives the parent's journal for a moment
        time.sleep(1.5)
        os._exit(0)
    try:
        journal.close()
        Journal.open(path, function=FN).close()
    finally:
        os.waitpid(pid, 0)


# -- bad journals: refused, named, untouched --------------------------------------------------


def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    path.write_text("these are my notes, not a database\n" * 200)
    before = file_digest(path)
    with pytest.raises(CheckpointError, match="is damaged or not a SQLite database") as caught:
        Journal.open(path, function=FN)
    assert str(path) in str(caught.value) and "left as it is" in str(caught.value)
    assert file_digest(path) == before
    assert isinstance(caught.value, MultitrackError)


def test_a_malformed_journal_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=3000)
    with contextlib.closing(sqlite3.connect(path)) as conn:  # Python 3.12+ left it in the WAL
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    assert len(data) > 20 * 4096
    data[8 * 4096 : 14 * 4096] = b"\xa5" * (6 * 4096)  # pages of the table: garbage
    path.write_bytes(bytes(data))
    before = file_digest(path)
    with pytest.raises(CheckpointError, match="damaged") as caught:
        Journal.open(path, function=FN)
    assert str(path) in str(caught.value)
    assert file_digest(path) == before
    assert (
        not (tmp_path / "run.sqlite-wal").exists()
        or (tmp_path / "run.sqlite-wal").stat().st_size == 0
    )


def test_a_sqlite_database_that_is_not_a_journal_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.execute("INSERT INTO users VALUES ('ada')")
        conn.commit()
    before = file_digest(path)
    with pytest.raises(CheckpointError, match="not a multitrack journal"):
        Journal.open(path, function=FN)
    assert file_digest(path) == before


def test_a_journal_from_a_newer_multitrack_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=2)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 41}")
        conn.commit()
    before = file_digest(path)
    with pytest.raises(CheckpointError) as caught:
        Journal.open(path, function=FN)
    message = str(caught.value)
    assert str(path) in message and "newer multitrack" in message
    assert f"version {SCHEMA_VERSION + 41}" in message and f"version {SCHEMA_VERSION}" in message
    assert file_digest(path) == before


def test_a_journal_writable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=1)
    path.chmod(0o666)
    with pytest.raises(CheckpointError, match="can be written by group or others") as caught:
        Journal.open(path, function=FN)
    assert "loading a pickle runs code" in str(caught.value)
    path.chmod(0o600)
    (tmp_path / "run.sqlite.d").mkdir(mode=0o777)
    os.chmod(tmp_path / "run.sqlite.d", 0o777)
    with pytest.raises(CheckpointError, match="result folder"):
        Journal.open(path, function=FN)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_journal_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=1)
    os.chown(path, 12345, 12345)
    with pytest.raises(CheckpointError, match="belongs to uid 12345, not to you") as caught:
        Journal.open(path, function=FN)
    assert str(path) in str(caught.value)


@contextlib.contextmanager
def mounted_tmpfs(options: str) -> Iterator[Path]:
    """A small tmpfs of our own, or a skip where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    where = Path(tempfile.mkdtemp(prefix="mt-journal-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        where.rmdir()


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True)


def test_a_read_only_folder_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        tmp_path.chmod(0o500)
        try:
            with pytest.raises(CheckpointError, match="lock file") as caught:
                Journal.open(tmp_path / "run.sqlite", function=FN)
            assert str(tmp_path / "run.sqlite") in str(caught.value)
        finally:
            tmp_path.chmod(0o700)
        return
    with mounted_tmpfs("size=1m,mode=700") as where:
        remount(where, "ro")
        with pytest.raises(CheckpointError, match="needs a folder it can write in") as caught:
            Journal.open(where / "run.sqlite", function=FN)
        assert str(where / "run.sqlite") in str(caught.value)


def test_a_read_only_journal_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=5)
    before = file_digest(path)
    if os.geteuid() != 0:
        path.chmod(0o400)
        read_only = contextlib.nullcontext()
    else:  # root writes through any mode: make the file itself read-only with a bind mount
        read_only = read_only_bind(path)
    with read_only, pytest.raises(CheckpointError, match="cannot be written") as caught:
        Journal.open(path, function=FN)
    assert str(path) in str(caught.value)
    assert file_digest(path) == before


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[None]:
    done = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount a file read-only here: {done.stderr!r}")
    try:
        if os.access(path, os.W_OK) and "ro" not in _mount_options(path):
            subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False)


def _mount_options(path: Path) -> list[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[3].split(",")
    return []


def test_a_full_disk_keeps_what_was_committed(tmp_path: Path) -> None:
    with mounted_tmpfs("size=1m,mode=700") as where:
        path = where / "run.sqlite"
        journal = Journal.open(path, function=FN)
        committed = [0]

        def write_until_full() -> None:
            for i in range(100_000):
                record(journal, key(i), 0, i, os.urandom(2000))
                if i % 20 == 19:
                    journal.commit()
                    committed[0] = i + 1

        with pytest.raises(CheckpointError, match="the disk is full") as caught:
            write_until_full()
        assert str(path) in str(caught.value)
        assert committed[0] > 50
        journal.close()  # releases the lock; no second error
        with pytest.raises(CheckpointError, match="the disk is full"):  # a broken journal says so
            record(journal, key(0), 0, 0, b"late")
        # Opened again, it indexes what the run stored: not on a disk still full, where it
        # says so and changes nothing; once there is room, everything committed is there.
        with contextlib.suppress(CheckpointError):
            Journal.open(path, function=FN).close()
        remount(where, "size=8m")
        with Journal.open(path, function=FN) as again:
            assert again.stored_ok >= committed[0]
            assert again.lookup(key(committed[0] - 1)) is not None


def test_a_full_disk_while_writing_a_result_file(tmp_path: Path) -> None:
    with mounted_tmpfs("size=1m,mode=700") as where:
        path = where / "run.sqlite"
        with Journal.open(path, function=FN) as journal:
            record(journal, key(0), 0, 0, b"small")
            journal.commit()
            with pytest.raises(CheckpointError, match="the disk is full") as caught:
                record(journal, key(1), 0, 1, b"x" * (2 << 20))
            assert str(path) in str(caught.value)
            assert [p.name for p in (where / "run.sqlite.d").iterdir()] == []  # no temp left
            with pytest.raises(CheckpointError, match="the disk is full"):
                journal.commit()
        with Journal.open(path, function=FN) as again:
            assert again.lookup(key(0)) is not None and again.lookup(key(1)) is None


# -- a changed function -----------------------------------------------------------------------


def test_keep_keeps_results_and_forgets_failures(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=9812, failed=171)
    with Journal.open(path, function=FN_EDITED) as journal:
        assert journal.function_changed
        message = journal.change_message or ""
        assert message.startswith("checkpoint: resize_one changed since run.sqlite was written (")
        assert message.endswith("); keeping 9,812 results, running 171 failures again")
        assert (journal.stored_ok, journal.stored_failed) == (9812, 0)
        assert journal.lookup(key(5)).ok  # type: ignore[union-attr]
        assert journal.lookup(key(9900)) is None
    with Journal.open(path, function=FN_EDITED) as journal:  # told once
        assert not journal.function_changed and journal.change_message is None


def test_restart_forgets_everything(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    with Journal.open(path, function=FN) as journal:
        record(journal, key(0), 0, 0, b"x" * (INLINE_LIMIT + 1))
    fill(path, ok=3, failed=1)
    with Journal.open(path, function=FN_EDITED, on_change="restart") as journal:
        assert "starting over: 4 stored tasks forgotten" in (journal.change_message or "")
        assert journal.lookup(key(1)) is None
        assert (journal.stored_ok, journal.stored_failed) == (0, 0)
    assert list((tmp_path / "run.sqlite.d").iterdir()) == []


def test_refuse_raises_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=3, failed=1)
    with pytest.raises(CheckpointError, match='on_change="refuse"') as caught:
        Journal.open(path, function=FN_EDITED, on_change="refuse")
    assert "resize_one changed since run.sqlite was written" in str(caught.value)
    with Journal.open(path, function=FN) as journal:  # the old function: all still there
        assert (journal.stored_ok, journal.stored_failed) == (3, 1)
        assert not journal.function_changed


def test_another_function_is_named(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    fill(path, ok=2)
    with Journal.open(path, function=("jobs:crop_one", b"1" * 16)) as journal:
        assert "run.sqlite was written (" in (journal.change_message or "")
        assert "for resize_one, not crop_one; keeping 2 results" in (journal.change_message or "")


def test_on_change_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_change must be one of keep, restart, refuse"):
        Journal.open(tmp_path / "run.sqlite", function=FN, on_change="warn")


# -- commits ----------------------------------------------------------------------------------


def test_commit_due_follows_the_interval_and_the_row_limit(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    with Journal.open(path, function=FN, interval=0.5, max_pending=3) as journal:
        assert not journal.commit_due(100.0)  # nothing waits
        record(journal, key(0), 0, 0, b"a")
        assert not journal.commit_due(100.2)
        assert journal.commit_due(100.5)
        assert journal.committed == 1
        for i in range(1, 4):
            record(journal, key(i), 0, i, b"a")
        assert journal.commit_due(100.6)  # 3 rows wait: no need to wait for the interval
        assert journal.committed == 4
        record(journal, key(9), 0, 9, b"a")
    with Journal.open(path, function=FN) as journal:  # close committed the last one
        assert journal.stored_ok == 5


WRITER = textwrap.dedent(
    """
    import pickle, sys, time
    from multitrack._checkpoint import Journal
    journal = Journal.open(sys.argv[1], function=("jobs:resize_one", b"1" * 16), interval=0.05)
    for span in range(10**9):  # spans of 16 tasks, as a run that started the journal stores
        tasks = range(16 * span, 16 * span + 16)
        values = [b"r" * (100 if span % 7 else 70_000) for _ in tasks]
        journal.record_span(tasks, pickle.dumps(values), args=pickle.dumps(list(tasks)),
                            seconds=0.0)
        if journal.commit_due(time.monotonic()):
            print(journal.committed, tasks[-1] + 1, flush=True)
    """
)


def test_a_killed_writer_loses_at_most_its_last_interval(tmp_path: Path) -> None:
    path = tmp_path / "run.sqlite"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout is not None
    reports = []
    try:
        while len(reports) < 8:
            line = writer.stdout.readline()
            assert line, "the writer stopped"
            reports.append([int(n) for n in line.split()])
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        writer.stdout.close()
    committed = reports[-1][0]
    with Journal.open(path, function=FN) as journal:
        stored = journal.stored_ok
        assert stored >= committed  # every reported commit survived
        # what came after the last report was at most one more commit
        assert all(journal.lookup(key(i)) is not None for i in range(0, committed, 97))
    print(f"\nkilled after {committed} committed; {stored} found on reopening")


def test_a_path_with_uri_characters_is_the_journal_itself(tmp_path: Path) -> None:
    """The read-only look at a journal goes through a ``file:`` URI: ``?``, ``#`` and ``%``
    in its path are the path's, not the URI's."""
    folder = tmp_path / "odd ?#%41 name"
    folder.mkdir()
    path = folder / "run?.sqlite"
    fill(path, ok=3)
    with Journal.open(path, function=FN) as journal:
        assert journal.stored_ok == 3
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("run?.sqlite")) == []


def test_closing_leaves_the_wal_to_the_next_open(tmp_path: Path) -> None:
    """Closing does not copy the WAL into the database (a checkpoint: two fsyncs, 5-20 ms at
    the end of every call); on every Python, not only 3.12+. The next open reads the WAL."""
    path = tmp_path / "run.sqlite"
    fill(path, ok=50)
    wal = tmp_path / "run.sqlite-wal"
    assert wal.exists() and wal.stat().st_size > 0
    with Journal.open(path, function=FN) as journal:  # a journal it already held
        record(journal, key(50), 0, 50, b"result 50")
    assert wal.exists() and wal.stat().st_size > 0
    with Journal.open(path, function=FN) as journal:
        assert journal.stored_ok == 51
        assert journal.lookup(key(50)).value == b"result 50"  # type: ignore[union-attr]


# -- cost -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_storing_small_results_costs_no_work_per_task(tmp_path: Path) -> None:
    """A run that starts a journal stores a row per span, not per task, and keys nothing
    (a row and a digest per task made 200,000 tiny tasks 67x slower): its next open indexes
    them once; lookups are per task. (What it costs is measured by the benchmarks, with the
    ``multitrack-checkpoint`` contender, not asserted here.)"""
    import sqlite3

    path = tmp_path / "run.sqlite"
    n, size = 100_000, 1_000
    with Journal.open(path, function=FN, interval=0.5) as journal:
        for first in range(0, n, size):
            tasks = range(first, first + size)
            payload, args = pickle.dumps([f"result {i}" for i in tasks]), pickle.dumps(list(tasks))
            journal.record_span(tasks, payload, args=args, seconds=0.001)
            journal.commit_due(time.monotonic())
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT COUNT(*), SUM(keys IS NOT NULL) FROM spans").fetchone()
        keyed = db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    assert (rows, keyed) == ((n // size, 0), 0), "a row or a key per task while storing"
    started = time.perf_counter()
    with Journal.open(path, function=FN) as journal:
        opened = time.perf_counter() - started
        started = time.perf_counter()
        found = [journal.lookup(key(i)) for i in range(n)]
        looked = time.perf_counter() - started
    assert [s.value if s else None for s in found[:: n // 10]] == [
        f"result {i}" for i in range(0, n, n // 10)
    ]
    assert all(s is not None for s in found)
    print(
        f"\n{n:,} small results: reopened (indexed) in {opened:.2f} s; looked up in "
        f"{looked:.2f} s ({looked / n * 1e6:.1f} us each); journal "
        f"{path.stat().st_size / 1e6:.1f} MB"
    )


def test_a_journal_of_the_older_format_is_refused_untouched(tmp_path: Path) -> None:
    """Version 1 (a row per task) was never released: refused with a message, not converted."""
    path = tmp_path / "run.sqlite"
    fill(path, ok=2)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version=1")
        conn.commit()
    before = file_digest(path)
    with pytest.raises(CheckpointError) as caught:
        Journal.open(path, function=FN)
    message = str(caught.value)
    assert str(path) in message and "older multitrack (journal version 1" in message
    assert file_digest(path) == before
