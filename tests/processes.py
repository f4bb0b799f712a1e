"""The child processes of this test process, for the leak checks (``conftest``'s guard after
every test, the generated-fault test after every example)."""

from __future__ import annotations

import psutil

from multitrack.backends import _zygote


def live_children() -> list[psutil.Process]:
    """This process's descendants that are still running (zombies do not count), but for
    the zygote workers are forked from: it lives as long as this process, by design, and
    runs no task (``backends/_zygote``)."""
    kept = {z.process.pid for z in _zygote._zygotes.values() if z.usable}
    try:
        return [
            p
            for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and p.pid not in kept
        ]
    except psutil.Error:
        return []
