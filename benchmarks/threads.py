"""Every thread of a measurement's process tree, watched from outside: CPU and wake-ups.

``ThreadSampler`` runs in the runner (not in the measured process, whose CPU and wake-ups it
would add to), and every ``SAMPLE_S`` reads, for each thread of the child and of its
descendants, ``/proc/PID/task/TID/``::

    schedstat   CPU time on the processor, in nanoseconds (not clock ticks of 10 ms: a
                reader thread may use a few milliseconds in a whole run)
    status      voluntary_ctxt_switches (it blocked and was woken: a wake-up) and
                nonvoluntary_ctxt_switches (it was preempted)
    syscall     the system call it is blocked in, or "running": what the thread is for
    comm        its name (CPython before 3.14 does not name its threads: usually "python")

A thread's figures are its last sample: CPU and switches since the thread began (every
worker and helper thread starts during the call). What it does between its last sample and
its exit is missed: up to ``SAMPLE_S`` of each thread's life, so the figures of threads that
end with the call are lower bounds. The descendants are found again every ``RESCAN_S``.
Cost: a few hundred small reads a second, in the runner, the same for every contender.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = ["SAMPLE_S", "SYSCALLS", "ThreadSampler", "ThreadSeen", "read_thread"]

SAMPLE_S = 0.010
RESCAN_S = 0.050
# x86-64 numbers of the calls threads of these libraries wait in (others are shown as numbers).
SYSCALLS = {
    0: "read",
    7: "poll",
    23: "select",
    35: "nanosleep",
    45: "recvfrom",
    47: "recvmsg",
    61: "wait4",
    202: "futex",
    230: "clock_nanosleep",
    232: "epoll_wait",
    247: "waitid",
    270: "pselect6",
    271: "ppoll",
    281: "epoll_pwait",
}


@dataclass
class ThreadSeen:
    """One thread, as last sampled."""

    pid: int
    tid: int
    first_seen: float
    last_seen: float
    comm: str = ""
    cpu_ns: int = 0
    vcs: int = 0  # voluntary context switches: wake-ups
    nvcs: int = 0  # involuntary ones: preemptions
    waits: Counter[str] = field(default_factory=Counter)  # syscall it was found blocked in

    def role(self) -> str:
        """What it mostly waits in ("running" when it was never found blocked)."""
        blocked = [(count, name) for name, count in self.waits.items() if name != "running"]
        return max(blocked)[1] if blocked else "running"

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "tid": self.tid,
            "comm": self.comm,
            "cpu_s": self.cpu_ns / 1e9,
            "vcs": self.vcs,
            "nvcs": self.nvcs,
            "alive_s": self.last_seen - self.first_seen,
            "role": self.role(),
        }


def read_thread(seen: ThreadSeen, now: float) -> bool:
    """Update ``seen`` from ``/proc``; ``False`` when the thread is gone."""
    base = Path(f"/proc/{seen.pid}/task/{seen.tid}")
    try:
        cpu = int((base / "schedstat").read_text().split()[0])
        status = (base / "status").read_text()
        call = (base / "syscall").read_text().split()[0]
        if not seen.comm:
            seen.comm = (base / "comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return False
    seen.cpu_ns = cpu
    for line in status.splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            seen.vcs = int(line.split()[1])
        elif line.startswith("nonvoluntary_ctxt_switches:"):
            seen.nvcs = int(line.split()[1])
    seen.waits[call if call == "running" else SYSCALLS.get(int(call), call)] += 1
    seen.last_seen = now
    return True


class ThreadSampler:
    """Samples every thread of the tree under ``root_pid`` in a thread until ``stop``."""

    def __init__(self, root_pid: int) -> None:
        self._root_pid = root_pid
        self._threads: dict[tuple[int, int], ThreadSeen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="thread-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> list[dict[str, Any]]:
        """Stop; every thread seen, as plain dicts (``ThreadSeen.as_dict``)."""
        self._stop.set()
        self._thread.join()
        return [seen.as_dict() for seen in self._threads.values()]

    def _loop(self) -> None:
        try:
            root = psutil.Process(self._root_pid)
        except psutil.Error:
            return
        live: list[ThreadSeen] = []
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_scan:
                live = self._scan(root, now)
                next_scan = now + RESCAN_S
            gone = [seen for seen in live if not read_thread(seen, now)]
            if gone:
                next_scan = 0.0
                live = [seen for seen in live if seen not in gone]
            self._stop.wait(SAMPLE_S)

    def _scan(self, root: psutil.Process, now: float) -> list[ThreadSeen]:
        """Every live thread of the tree, known ones kept, new ones added."""
        try:
            pids = [root.pid, *(child.pid for child in root.children(recursive=True))]
        except psutil.Error:
            return []
        live = []
        for pid in pids:
            try:
                tids = [int(name) for name in _listdir(f"/proc/{pid}/task")]
            except ValueError:
                continue
            for tid in tids:
                seen = self._threads.get((pid, tid))
                if seen is None:
                    seen = self._threads[pid, tid] = ThreadSeen(pid, tid, now, now)
                live.append(seen)
        return live


def _listdir(path: str) -> list[str]:
    try:
        return [entry.name for entry in Path(path).iterdir()]
    except OSError:
        return []
