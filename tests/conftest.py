"""Suite-wide guards: after every test, no child process and no extra thread may be left.

A test that leaves a worker behind fails, even if its assertions passed: "nothing outlives a
call" is a promise, so every test checks it (after loky's test suite)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterator

import psutil
import pytest

# Bars off by default in tests; tests of the bar turn it on explicitly.
os.environ.setdefault("MULTITRACK_PROGRESS", "0")
# numpy's OpenBLAS starts a thread per core when imported (test modules import it); with them
# alive the process backend would never fork a worker here, and the fork path would go
# untested. One BLAS thread, as each worker gets on this 2-core machine anyway.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from multitrack.backends import _platform, _start
from processes import live_children

LEAK_GRACE = 3.0  # seconds a child or thread may take to go away after a call returned


# A suite started in the background by a shell without job control inherits SIGINT ignored, and
# so would every script the Ctrl-C tests start (an ignored signal stays ignored across exec):
# they would test nothing. Restore Python's handler here; children then get the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _extra_threads(before: set[int]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leftovers() -> Iterator[None]:
    threads_before = {t.ident for t in threading.enumerate() if t.ident is not None}
    yield
    deadline = time.monotonic() + LEAK_GRACE
    while (live_children() or _extra_threads(threads_before)) and time.monotonic() < deadline:
        time.sleep(0.05)
    children = live_children()
    threads = _extra_threads(threads_before)
    for child in children:  # do not let one leak cascade into every later test
        try:
            child.kill()
        except psutil.Error:
            pass
    assert not children, f"child processes left behind: {[c.pid for c in children]}"
    assert not threads, f"threads left behind: {[t.name for t in threads]}"


# Python 3.12+ warns when a process with threads forks ("This process (pid=...) is
# multi-threaded, use of fork() may lead to deadlocks in the child"), but os.fork clears that
# warning instead of raising it, so pyproject's `filterwarnings = ["error"]` would silence it.
# Here it is recorded instead, and fails the test that forked.
FORK_WARNING = re.compile(r"This process \(pid=\d+\) is multi-threaded")


@contextlib.contextmanager
def fork_warnings_fail() -> Iterator[None]:
    """Fail if a fork-with-threads warning is emitted inside; other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.filterwarnings("always", message=FORK_WARNING.pattern, category=DeprecationWarning)
        yield
    forks = [w for w in caught if FORK_WARNING.match(str(w.message))]
    for other in (w for w in caught if w not in forks):  # to pytest's own filters, as before
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if forks:
        pytest.fail(
            "fork() with other threads alive (an error here): "
            + "; ".join(f"{w.filename}:{w.lineno}: {w.message}" for w in forks),
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def no_fork_with_threads() -> Iterator[None]:
    with fork_warnings_fail():
        yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Cluster tests last (and any test marked ``dask`` or ``ray``). Ray and dask leave native
    threads (grpc, Ray's I/O) in this process after their clusters stop, and with any other
    thread alive the process backend starts fresh interpreters instead of forks; importing
    ``distributed`` alone changes how exceptions pickle. Every other test should see a
    single-threaded process without them, as a user's script is."""
    items.sort(key=_uses_a_cluster_engine)


def _uses_a_cluster_engine(item: pytest.Item) -> bool:
    if item.path.name == "test_distributed.py":
        return True
    return any(item.get_closest_marker(name) for name in ("dask", "ray"))


@pytest.fixture(params=["fork", "spawn"])
def each_start_method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with workers forked from the caller and once with the default start
    (forks of the zygote on Linux, fresh interpreters elsewhere): the variable reaches the
    scripts a test starts, too."""
    method: str = request.param
    if method == "fork" and not _platform.CAN_FORK:
        pytest.skip(f"fork is not used here ({_platform.WITHOUT_ENV} or not Linux)")
    monkeypatch.setenv(_start.START_METHOD_ENV, method)
    return method
