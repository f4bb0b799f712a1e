"""What the machine says about memory: sizes, limits, per-process use, and OOM kills.

This module only *reads* (``/proc``, the cgroup files, the kernel log) and parses; it decides
nothing. The process backend samples workers with it (``backends._memwatch``), the run-wide
budget (``_budget``) starts from ``auto_budget``, and a worker's SIGKILL is explained by
``OomWitness``::

    /proc/PID/smaps_rollup (Pss) ── pss(pid) ──▶ backends._memwatch: per-worker limit, samples
    /proc/meminfo, cgroup limits,
    RLIMIT_RSS ── auto_budget() ──▶ _budget.Budget: pause, shed, parallelism
    cgroup oom_kill, /proc/vmstat,
    /dev/kmsg ── OomWitness.explain(pid) ──▶ WorkerCrashed's message: OOM or not, from evidence

Why PSS: a forked worker shares the caller's pages copy-on-write; RSS counts them once per
worker (ten workers of a 2 GB caller would "use" 20 GB), PSS splits each shared page among
the processes that map it, so the workers' PSS add up to what they really cost. Where
``smaps_rollup`` is missing (kernels before 4.14), ``VmRSS`` from ``/proc/PID/status`` stands
in. Every reader returns ``None`` where the file is missing or unreadable (not Linux, a process
already gone): memory limits are then simply not enforced, never an error.

Why evidence for OOM: a SIGKILL may come from the kernel's OOM killer, a cluster's job
manager, or a user's ``kill -9``; "often the OOM killer" sends users hunting (mpire#130). The
kernel says what it did in three places: the cgroup's ``oom_kill`` counter (v2
``memory.events``, v1 ``memory.oom_control``), the machine's (``/proc/vmstat``), and its log
("Killed process PID"). The log names the pid: definitive. The counters only say that *some*
process was killed since the last look, so each death consumes one kill of the difference.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass

__all__ = [
    "OomWitness",
    "auto_budget",
    "cgroup_anon",
    "format_size",
    "parse_size",
    "pss",
]

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
# a cgroup "limit" this large means no limit (v1 writes 2**63 rounded down to a page)
_UNLIMITED = 1 << 60


def parse_size(name: str, value: object) -> int:
    """Bytes from an int or a string such as ``"2GB"`` (10**9), ``"512MiB"`` (2**20 each) or
    ``"1.5g"``; errors name the argument.

    Example:
        >>> parse_size("memory_limit", "512MiB"), parse_size("memory_limit", "2GB")
        (536870912, 2000000000)
        >>> parse_size("memory_limit", "lots")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: memory_limit='lots' is not a size: give bytes (an int) or a string like ...
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number of bytes or a string like '2GB', got bool")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(
                f"{name}={value!r} is not a size: give bytes (an int) or a string like "
                "'2GB' or '512MiB'"
            )
        digits, prefix, binary, _ = match.groups()
        prefix = prefix.lower()
        if binary and not prefix:
            raise ValueError(f"{name}={value!r} is not a size: 'iB' needs a prefix (KiB, MiB...)")
        unit = 1024 ** ("kmgt".index(prefix) + 1) if binary else _UNITS[prefix]
        number = int(float(digits) * unit)
    else:
        raise TypeError(
            f"{name} must be a number of bytes or a string like '2GB', got {type(value).__name__}"
        )
    if number < 1:
        raise ValueError(f"{name} must be at least 1 byte, got {value!r}")
    return number


def format_size(size: float) -> str:
    """A byte count for people, in decimal units as ``"2GB"`` is read.

    Example:
        >>> format_size(312_400_000), format_size(1_950_000_000), format_size(900)
        ('312 MB', '1.95 GB', '900 B')
    """
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{size:.0f} B"


# -- one process ---------------------------------------------------------------------------


def pss(pid: int | str) -> int | None:
    """Proportional set size of process ``pid`` in bytes (``"self"``: this one), or its RSS
    where the kernel has no ``smaps_rollup``; ``None`` when it cannot be read (gone, not Linux).

    Example:
        >>> size = pss("self")
        >>> size is None or size > 1_000_000
        True
    """
    text = _read(f"/proc/{pid}/smaps_rollup", 512)
    key = b"\nPss:"
    if text is None:
        text, key = _read(f"/proc/{pid}/status", 4096), b"\nVmRSS:"
        if text is None:
            return None
    start = text.find(key)
    if start < 0:
        return None
    fields = text[start + len(key) : text.find(b"\n", start + 1)].split()
    return int(fields[0]) * 1024 if fields else None


def _read(path: str, size: int) -> bytes | None:
    """The first ``size`` bytes of a ``/proc`` or cgroup file (two system calls, no Python
    file object: samples are taken several times a second)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, size)
    except OSError:
        return None
    finally:
        os.close(fd)


# -- the run's budget ----------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """The memory a whole run may use, and what set it."""

    size: int
    source: str  # "the machine's memory", "the cgroup's limit", "RLIMIT_RSS"


def auto_budget() -> Budget:
    """``memory_limit="auto"``: the smallest of the machine's memory, this process's cgroup
    limit (v1 or v2, ancestors included) and ``RLIMIT_RSS``.

    Example:
        >>> auto_budget().size > 0
        True
    """
    found = [Budget(_machine_memory(), "the machine's memory")]
    cgroup = cgroup_limit()
    if cgroup is not None:
        found.append(Budget(cgroup, "the cgroup's limit"))
    rlimit = _rss_rlimit()
    if rlimit is not None:
        found.append(Budget(rlimit, "RLIMIT_RSS"))
    return min(found, key=lambda budget: budget.size)


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62


def _rss_rlimit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_RSS)[0]
    return None if soft in (resource.RLIM_INFINITY, -1) or soft >= _UNLIMITED else soft


def cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup, the tightest of it and its ancestors
    (v2 ``memory.max`` and ``memory.high``; v1 ``hierarchical_memory_limit``); ``None``: none.

    Example:
        >>> limit = cgroup_limit()
        >>> limit is None or limit > 0
        True
    """
    limits: list[int] = []
    v2 = _cgroup_dir("v2")
    if v2 is not None:
        for directory in _ancestors(v2):
            for name in ("memory.max", "memory.high"):
                value = _number(os.path.join(directory, name))
                if value is not None:
                    limits.append(value)
    v1 = _cgroup_dir("v1")
    if v1 is not None:
        value = _stat_field(os.path.join(v1, "memory.stat"), b"hierarchical_memory_limit")
        if value is None:
            value = _number(os.path.join(v1, "memory.limit_in_bytes"))
        if value is not None:
            limits.append(value)
    limits = [limit for limit in limits if limit < _UNLIMITED]
    return min(limits, default=None)


def cgroup_anon() -> int | None:
    """The anonymous and shared memory charged to this process's cgroup: what the kernel
    cannot reclaim (without swap) and counts against its limit, of every process in it.
    File cache is left out: the kernel drops it before it kills.

    Example:
        >>> used = cgroup_anon()
        >>> used is None or used >= 0
        True
    """
    v2 = _cgroup_dir("v2")
    if v2 is not None and os.path.exists(os.path.join(v2, "memory.stat")):
        fields = _stat_fields(os.path.join(v2, "memory.stat"), (b"anon", b"shmem"))
    else:
        v1 = _cgroup_dir("v1")
        if v1 is None:
            return None
        fields = _stat_fields(os.path.join(v1, "memory.stat"), (b"total_rss", b"total_shmem"))
    return sum(fields) if fields else None


_MOUNTS = {"v2": ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"), "v1": ("/sys/fs/cgroup/memory",)}


@functools.cache
def _cgroup_dir(version: str) -> str | None:
    """The directory of this process's memory cgroup (v1) or unified cgroup (v2), where its
    memory files are. Inside a cgroup namespace the path is ``/`` and the mount is it."""
    text = _read("/proc/self/cgroup", 4096)
    if text is None:
        return None
    for line in text.decode(errors="replace").splitlines():
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        wanted = controllers == "" if version == "v2" else "memory" in controllers.split(",")
        if not wanted:
            continue
        for mount in _MOUNTS[version]:
            probe = "memory.max" if version == "v2" else "memory.limit_in_bytes"
            for directory in (mount + path.rstrip("/"), mount):
                if os.path.exists(os.path.join(directory, probe)):
                    return directory
    return None


def _ancestors(directory: str) -> list[str]:
    """``directory`` and its parents down to the cgroup mount (the root has no limit file)."""
    found = []
    while os.path.exists(os.path.join(directory, "memory.max")):
        found.append(directory)
        directory = os.path.dirname(directory)
    return found


def _number(path: str) -> int | None:
    text = _read(path, 64)
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):  # "max"
        return None


def _stat_field(path: str, key: bytes) -> int | None:
    """``key value`` from a flat keyed file (``memory.stat``, ``memory.events``, vmstat)."""
    found = _stat_fields(path, (key,))
    return found[0] if found else None


def _stat_fields(path: str, keys: tuple[bytes, ...]) -> list[int]:
    """The values of ``keys`` found in a flat keyed file."""
    text = _read(path, 1 << 16)
    if text is None:
        return []
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] in keys:
            found.append(int(fields[1]))
    return found


# -- why a worker died ---------------------------------------------------------------------


@dataclass(frozen=True)
class OomCounts:
    """The kernel's OOM-kill counters at one moment (``None``: unreadable)."""

    cgroup: int | None
    machine: int | None

    @classmethod
    def now(cls) -> OomCounts:
        cgroup = None
        v2 = _cgroup_dir("v2")
        if v2 is not None:
            cgroup = _stat_field(os.path.join(v2, "memory.events"), b"oom_kill")
        if cgroup is None:
            v1 = _cgroup_dir("v1")
            if v1 is not None:
                cgroup = _stat_field(os.path.join(v1, "memory.oom_control"), b"oom_kill")
        # The victim's cgroup counts every OOM kill of it, the machine's too, so the machine's
        # counter (a 40 us read of /proc/vmstat) is read only where no cgroup counter is.
        machine = _stat_field("/proc/vmstat", b"oom_kill") if cgroup is None else None
        return cls(cgroup, machine)


class OomWitness:
    """Tells whether the kernel's OOM killer killed a worker, from evidence: the kernel log
    where it is readable, else the rise of the OOM-kill counters since ``__init__`` (or the
    last kill this witness already accounted for).

    Example:
        >>> witness = OomWitness()
        >>> verdict = witness.explain(2**22 + 1)  # (bool, text), or None where unreadable
        >>> verdict is None or isinstance(verdict[0], bool)
        True
    """

    def __init__(self) -> None:
        self._seen = OomCounts.now()
        # Kernel log records older than this are of processes that had this pid before.
        self._since_us = int((time.monotonic() - 1.0) * 1e6)

    def explain(self, pid: int | None) -> tuple[bool, str] | None:
        """(killed by the OOM killer?, the evidence) for worker ``pid``, just killed by
        SIGKILL; ``None`` when nothing can be known here."""
        record = _kernel_record(pid, self._since_us) if pid is not None else None
        now = OomCounts.now()
        rose = [
            (what, before, after)
            for what, before, after in (
                ("the cgroup's oom_kill", self._seen.cgroup, now.cgroup),
                ("the machine's oom_kill", self._seen.machine, now.machine),
            )
            if before is not None and after is not None and after > before
        ]
        # One kill of each counter's rise is this death's: the next death has its own.
        self._seen = OomCounts(
            _consume(self._seen.cgroup, now.cgroup), _consume(self._seen.machine, now.machine)
        )
        if record is not None:
            return True, f"the kernel log says: {record}"
        if rose:
            what, before, after = rose[0]
            return True, f"{what} count rose from {before} to {after}"
        if now.cgroup is None and now.machine is None:
            return None
        return False, "no out-of-memory kill was recorded (oom_kill counters unchanged)"


def _logged_at(record: bytes) -> int:
    """A /dev/kmsg record's time ("level,seq,usec,flags;text")."""
    try:
        return int(record.split(b";", 1)[0].split(b",")[2])
    except (IndexError, ValueError):
        return 0


def _consume(before: int | None, after: int | None) -> int | None:
    if before is None or after is None:
        return after
    return before + 1 if after > before else after


def _kernel_record(pid: int, since_us: int, path: str = "/dev/kmsg") -> str | None:
    """The kernel's own line on killing ``pid`` ("Killed process PID (name) ... anon-rss...")
    logged after ``since_us`` (its log's clock: microseconds since boot, as
    ``time.monotonic``), when its log is readable (root, or a readable /dev/kmsg)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    wanted = f"Killed process {pid} ".encode()
    found = None
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: records overwritten while reading; read on
                continue
            if not record:
                break
            if wanted in record and _logged_at(record) >= since_us:
                found = record
    finally:
        os.close(fd)
    if found is None:
        return None
    message = found.split(b";", 1)[-1].split(b"\n", 1)[0].decode(errors="replace")
    return message.strip()
