"""Watching one measurement's processes from outside: peak memory, and nothing left behind.

**Peak memory** (``PeakSampler``): a thread in the runner samples, every 20 ms, the memory of
the child and all its descendants and keeps the maximum of::

    sum over the tree of (RssAnon + RssFile)   private memory and mapped files, per process
  + growth of the machine's Shmem since the run started   shared memory, counted once

Plain RSS would miss shared memory nobody has touched yet (multitrack passes large arrays in
``memfd`` shared memory: a result the caller has not read is in no process's RSS) and count
touched shared pages once per process; joblib's memory-mapped arrays in ``/dev/shm`` are
shared memory too. ``Shmem`` is machine-wide, so another process allocating shared memory at
the same time would be counted (the runner checks that the machine is quiet: ``noise``). Private
pages are still counted once per process that has them: copy-on-write pages after ``fork`` and
shared libraries make the sum over-state what forking libraries really use, a little; that is
what ``top`` shows, and the same yardstick for everyone. The tree is re-read (a scan of
``/proc``, about 2 ms) every 100 ms and whenever a known process is gone; between scans only
the known processes' ``/proc/PID/status`` is read, so the sampler costs a few percent of one
core, the same for every contender. It runs only for the workloads that report memory.

**Orphans** (``become_subreaper``, ``reap_orphans``): workers a library leaves to exit on
their own (joblib's loky keeps its workers for reuse) are orphaned when the child exits. The
runner makes itself their *subreaper* (``PR_SET_CHILD_SUBREAPER``), so they are re-parented to
it, and reaps them, which adds their CPU time to its ``RUSAGE_CHILDREN`` like any other child's
(``benchmarks.noise`` counts on that).

**Leftovers** (``token_processes``, ``kill_all``): every child gets a unique ``BENCH_TOKEN`` in
its environment, which its workers inherit, whatever session or process group they put
themselves in (multitrack's workers start their own session). After the child exits, any
process still carrying the token was left behind by the library: it is counted in the report
and killed, so it cannot steal CPU from the next measurement. A timed-out child is killed with
its whole tree the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
import time

import psutil

__all__ = [
    "SAMPLE_S",
    "TOKEN",
    "PeakSampler",
    "become_subreaper",
    "kill_all",
    "reap_orphans",
    "token_processes",
    "wait_gone",
]

SAMPLE_S = 0.020  # seconds between two memory samples
RESCAN_S = 0.100  # seconds between two scans for new descendants
TOKEN = "BENCH_TOKEN"
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


class PeakSampler:
    """The peak memory of a process tree (see above), sampled in a thread until ``stop``."""

    def __init__(self, root_pid: int) -> None:
        self.peak_bytes = 0
        self._root_pid = root_pid
        self._shmem_at_start = _shmem_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> int:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes

    def _loop(self) -> None:
        try:
            root = psutil.Process(self._root_pid)
        except psutil.Error:
            return
        known: list[int] = []
        next_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_scan:
                known = _tree(root)
                next_scan = now + RESCAN_S
            private, lost = _private_sum(known)
            if lost:
                next_scan = 0.0
            shared = max(0, _shmem_bytes() - self._shmem_at_start)
            self.peak_bytes = max(self.peak_bytes, private + shared)
            self._stop.wait(SAMPLE_S)


def _tree(root: psutil.Process) -> list[int]:
    try:
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def _private_sum(pids: list[int]) -> tuple[int, bool]:
    """(sum of RssAnon + RssFile in bytes, whether some process had gone)."""
    total = 0
    lost = False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as status:
                for line in status:
                    if line.startswith((b"RssAnon:", b"RssFile:")):
                        total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            lost = True
    return total, lost


def _shmem_bytes() -> int:
    """The machine's shared memory (tmpfs, memfd, SysV) in bytes, from ``/proc/meminfo``."""
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"Shmem:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def token_processes(token: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment carries ``BENCH_TOKEN=token``."""
    found = []
    me = os.getpid()
    for process in psutil.process_iter():
        if process.pid == me:
            continue
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(TOKEN) == token:
                found.append(process)
        except psutil.Error:
            continue
    return found


def kill_all(processes: list[psutil.Process]) -> None:
    """SIGKILL each process (they may be gone already) and reap what we can."""
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=2)


def wait_gone(token: str, grace: float) -> list[psutil.Process]:
    """Wait up to ``grace`` seconds for the token's processes to exit; those left."""
    deadline = time.monotonic() + grace
    left = token_processes(token)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = token_processes(token)
    return left


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux); whether it worked."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def reap_orphans() -> None:
    """Collect every exited child not waited for yet (orphans re-parented to us)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass
