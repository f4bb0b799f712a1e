"""What a worker's start costs the caller: nothing on a fork's path that only another path needs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from multitrack.backends import _platform


@pytest.mark.skipif(not _platform.CAN_FORK, reason="start_method='fork' needs fork")
def test_a_fork_of_the_caller_does_not_import_the_zygote() -> None:
    # Asking whether a worker was forked imported _zygote (and pickletools): milliseconds
    # between one worker's fork and the next, on the path of every fork-started call.
    # (Forks asked for by the environment: then no zygote is started ahead of the call.)
    code = (
        "import sys, multitrack as mt\n"
        "assert mt.map(abs, [-1, -2], workers=2, progress=False) == [1, 2]\n"
        "print(sorted(m for m in sys.modules if m.endswith('_zygote')))\n"
    )
    env = {**os.environ, "MULTITRACK_START_METHOD": "fork"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
