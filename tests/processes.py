"""The child processes of this test process, for the leak checks (``conftest``'s guard after
every test, the generated-fault test after every example)."""

from __future__ import annotations

import psutil


def live_children() -> list[psutil.Process]:
    """This process's descendants that are still running (zombies do not count)."""
    try:
        return [
            p
            for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
    except psutil.Error:
        return []
