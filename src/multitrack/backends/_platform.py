"""What the operating system gives the process backend, decided once, in one place: the
features below, and how many CPUs the process may use (``usable_cpus``: the default pool size,
and the native thread caps a zygote is started with).

Linux gives everything the backend is built on; other POSIX systems lack some of it, and the
backend has a fallback for each missing piece::

    feature   Linux                        elsewhere (macOS)              fallback
    pidfd     a worker's death wakes the   none                           socket EOF, and a poll
              parent's wait at once                                       of the workers every 0.5 s
    memfd     large buffers and the slot   none                           buffers in the message;
              in anonymous shared memory                                  the slot in a temp file
    fork      workers forked from the      unsafe (system frameworks)     fresh interpreters (the
              zygote (or the caller)                                      same semantics); no
                                                                          start_method="fork"

``MULTITRACK_WITHOUT=pidfd,memfd,fork`` switches features off on Linux too, so that the
fallbacks run in the test suite (``.ci/matrix.py`` runs the contract and fault tests that way);
it is read by the caller and, through the environment, by its workers.

Windows has neither ``fork`` nor the socket and signal semantics the backend needs
(``killpg``, ``SCM_RIGHTS``, sessions): ``require_posix`` refuses it up front, naming what works
there.
"""

from __future__ import annotations

import math
import os
import socket
import sys

WITHOUT_ENV = "MULTITRACK_WITHOUT"
FEATURES = ("pidfd", "memfd", "fork")


def _switched_off() -> frozenset[str]:
    names = {name.strip() for name in os.environ.get(WITHOUT_ENV, "").split(",") if name.strip()}
    unknown = names - set(FEATURES)
    if unknown:
        raise ValueError(
            f"{WITHOUT_ENV}={os.environ[WITHOUT_ENV]!r}: unknown feature(s) "
            f"{', '.join(sorted(unknown))}; the features are {', '.join(FEATURES)}"
        )
    return frozenset(names)


_OFF = _switched_off()
HAS_PIDFD = hasattr(os, "pidfd_open") and "pidfd" not in _OFF
HAS_MEMFD = hasattr(os, "memfd_create") and "memfd" not in _OFF
SHARED_MEMORY = HAS_MEMFD and hasattr(socket, "send_fds")
CAN_FORK = sys.platform == "linux" and "fork" not in _OFF


def require_posix() -> None:
    """Raise a clear error on a platform the process backend does not support.

    Example:
        >>> require_posix()  # on Linux and macOS: nothing to say
    """
    if os.name != "posix":
        raise RuntimeError(
            f"multitrack's process backend needs a POSIX system (Linux, macOS); this is "
            f"{sys.platform}. Use backend='thread' (I/O-bound work, code that releases the "
            "GIL) or backend='dask' / 'ray', or run under WSL."
        )


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask (or ``os.process_cpu_count``,
    which honours ``PYTHON_CPU_COUNT`` on 3.13+), and a cgroup CPU quota (containers,
    slurm) when one is set. ``os.cpu_count()`` counts the machine, which oversubscribes.

    Example:
        >>> usable_cpus() >= 1
        True
    """
    process_cpu_count = getattr(os, "process_cpu_count", None)
    count: int | None = process_cpu_count() if process_cpu_count is not None else None
    if count is None:
        try:
            count = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            count = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def _cgroup_quota() -> int | None:
    candidates = (
        ("/sys/fs/cgroup/cpu.max", None),  # cgroup v2: "max 100000" or "200000 100000"
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    )
    for first, second in candidates:
        try:
            with open(first) as handle:
                fields_ = handle.read().split()
            if second is not None:
                with open(second) as handle:
                    fields_.append(handle.read().strip())
        except OSError:
            continue
        if len(fields_) >= 2 and fields_[0] not in ("max", "-1"):
            try:
                return max(1, math.ceil(int(fields_[0]) / int(fields_[1])))
            except (ValueError, ZeroDivisionError):
                return None
        return None
    return None
