"""The suite's own guards (conftest.py) catch what they promise to catch."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings

import pytest

from conftest import fork_warnings_fail

FAILED = r"fork\(\) with other threads alive"
MESSAGE = (
    "This process (pid=1) is multi-threaded, use of fork() may lead to deadlocks in the child."
)


def test_a_fork_warning_fails_the_test() -> None:
    with pytest.raises(pytest.fail.Exception, match=FAILED), fork_warnings_fail():
        warnings.warn(MESSAGE, DeprecationWarning, stacklevel=1)


def test_other_warnings_still_meet_the_configured_filters() -> None:
    with pytest.raises(UserWarning, match="not about fork"), fork_warnings_fail():
        warnings.warn("not about fork", UserWarning, stacklevel=1)  # "error" in pyproject


def test_a_real_fork_with_a_thread_alive_fails_on_3_12_and_later() -> None:
    """Python 3.12 added the warning (and os.fork swallows it when it is an error)."""
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        with contextlib.ExitStack() as stack:
            if sys.version_info >= (3, 12):
                stack.enter_context(pytest.raises(pytest.fail.Exception, match=FAILED))
            stack.enter_context(fork_warnings_fail())
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
    finally:
        stop.set()
        thread.join()
