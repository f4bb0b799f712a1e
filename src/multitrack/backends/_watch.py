"""What the process backend's parent waits on: one ``poll`` over every worker's descriptors.

The scheduler's only blocking call is ``Watch.wait``, with a timeout equal to the next
deadline. Every worker's socket, pidfd and output pipes are registered once, when the worker
starts, and dropped before the descriptor is closed (a number the kernel hands out again must
never stay registered as the old one). A socket with queued outgoing bytes is also watched for
writability, so sends never block the parent (``_channel.Channel.queue``). Registering all of
them anew for each wait cost a dozen system calls per scheduler step, in a loop that runs once
per chunk on the same cores as the workers (docs/performance.md).

``select.poll``, not ``select.select`` (which fails on descriptors over 1023, which a busy
parent can have), nor ``multiprocessing.connection.wait`` (5 ms of imports on a first call).
"""

from __future__ import annotations

import math
import select
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

Owner = TypeVar("Owner")

_READ = select.POLLIN  # hang-ups and errors are always reported
_WRITE = select.POLLOUT


class Watch(Generic[Owner]):
    """Descriptors, each with its owner and what it is (``"conn"``, ``"pidfd"``, ...)."""

    def __init__(self) -> None:
        self._poller = select.poll()
        self._by_fd: dict[int, tuple[Owner, str]] = {}
        self._writing: set[int] = set()

    def add(self, fd: int, owner: Owner, what: str) -> None:
        self._poller.register(fd, _READ)
        self._by_fd[fd] = (owner, what)

    def discard(self, fd: int) -> None:
        if self._by_fd.pop(fd, None) is not None:
            self._poller.unregister(fd)
            self._writing.discard(fd)

    def want_write(self, fd: int, wanted: bool) -> None:
        """Also report ``fd`` when it becomes writable (``wanted``), or stop doing so."""
        if fd not in self._by_fd or (fd in self._writing) == wanted:
            return
        if wanted:
            self._writing.add(fd)
            self._poller.modify(fd, _READ | _WRITE)
        else:
            self._writing.discard(fd)
            self._poller.modify(fd, _READ)

    def wait(self, timeout: float | None) -> list[tuple[Owner, str, bool]]:
        """(owner, what, readable) of the descriptors ready within ``timeout`` seconds:
        readable, closed, or (``readable`` false) only writable."""
        ready = []
        for fd, flags in self._poller.poll(_milliseconds(timeout)):
            entry = self._by_fd.get(fd)
            if flags & select.POLLNVAL:  # closed without discard (a bug): never spin on it
                self.discard(fd)
            if entry is not None:
                ready.append((entry[0], entry[1], bool(flags & ~_WRITE)))
        return ready


def wait_readable(waitables: dict[Any, Hashable], timeout: float | None) -> list[Any]:
    """The keys of ``waitables`` (file descriptors, or objects with ``fileno()``) ready to
    read, or closed, within ``timeout`` seconds: a one-off wait, registered afresh."""
    poller = select.poll()
    by_fd: dict[int, Any] = {}
    for obj in waitables:
        fd = obj if isinstance(obj, int) else obj.fileno()
        by_fd[fd] = obj
        poller.register(fd, _READ)
    return [by_fd[fd] for fd, _ in poller.poll(_milliseconds(timeout))]


def _milliseconds(timeout: float | None) -> int | None:
    return None if timeout is None else math.ceil(max(0.0, timeout) * 1000)
