"""The public surface is exactly ``multitrack.__all__``; every public name is documented."""

from __future__ import annotations

import inspect

import multitrack as mt

EXPECTED = {
    "CheckpointError",
    "MemoryLimitExceeded",
    "MultitrackError",
    "Pool",
    "RemoteError",
    "TaskError",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerStartError",
    "imap",
    "map",
    "starmap",
    "track_iter_progress",
    "track_parallel_progress",
    "track_progress",
}


def test_all_is_the_public_surface() -> None:
    assert set(mt.__all__) == EXPECTED
    public = {name for name in dir(mt) if not name.startswith("_")}
    assert public == EXPECTED


def test_every_public_name_is_documented_with_an_example() -> None:
    for name in mt.__all__:
        obj = getattr(mt, name)
        doc = inspect.getdoc(obj) or ""
        assert doc, f"{name} has no docstring"
        assert ">>>" in doc or "Example" in doc, f"{name}'s docstring has no example"
        assert obj.__module__ == "multitrack", f"{name} shows as {obj.__module__}"


def test_error_tree() -> None:
    assert issubclass(mt.TaskError, mt.MultitrackError)
    assert issubclass(mt.WorkerCrashed, mt.TaskError)
    assert issubclass(mt.TaskTimeout, mt.TaskError)
    assert issubclass(mt.TaskTimeout, TimeoutError)
    assert issubclass(mt.MemoryLimitExceeded, mt.TaskError)
    assert issubclass(mt.WorkerStartError, mt.MultitrackError)
    assert not issubclass(mt.WorkerStartError, mt.TaskError)


def test_task_error_survives_pickling() -> None:
    import pickle

    error = mt.WorkerCrashed(
        "boom", index=3, task="a.png", attempts=2, exitcode=None, signal="SIGKILL", pid=42
    )
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.index, copy.task, copy.attempts, copy.signal, copy.pid) == (
        3,
        "a.png",
        2,
        "SIGKILL",
        42,
    )
    assert str(copy) == "boom"
