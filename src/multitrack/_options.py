"""The options every call takes, checked at the boundary.

Every check happens before a worker starts, and every message names the argument and says what
was wrong with it, so a typo costs a traceback line, not a pool of processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from multitrack.backends import NAMES as BACKENDS

ERROR_MODES = ("raise", "return")


@dataclass(frozen=True)
class Options:
    """Validated options of one call (or the defaults of one ``Pool``)."""

    workers: int
    backend: str = "process"
    ordered: bool = True
    chunksize: int | None = None
    progress: bool | str = True
    desc: str | None = None
    errors: str = "raise"
    timeout: float | None = None
    retries: int = 0
    retry_delay: float = 0.0
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    max_tasks_per_worker: int | None = None
    address: str | None = None  # dask/ray: the cluster to attach to
    client: Any = None  # dask: an existing distributed.Client
    # Not an option: ``workers`` was left to its default, so a backend attaching to an
    # existing cluster may use all of it instead of this machine's CPU count.
    fit_cluster: bool = False


#: options that shape the workers themselves: a Pool takes them once, not per call
POOL_ONLY = (
    "workers",
    "backend",
    "initializer",
    "initargs",
    "max_tasks_per_worker",
    "address",
    "client",
)
#: the backends that run on a cluster (``address=``, ``client=``)
CLUSTER_BACKENDS = ("dask", "ray")


def usable_cpus() -> int:
    """CPUs this process may really use: its affinity mask, and a cgroup CPU quota (containers,
    slurm) when one is set. ``os.cpu_count()`` counts the machine, which oversubscribes."""
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
                fields = handle.read().split()
            if second is not None:
                with open(second) as handle:
                    fields.append(handle.read().strip())
        except OSError:
            continue
        if len(fields) >= 2 and fields[0] not in ("max", "-1"):
            try:
                return max(1, math.ceil(int(fields[0]) / int(fields[1])))
            except (ValueError, ZeroDivisionError):
                return None
        return None
    return None


def _positive_int(name: str, value: Any, *, allow_none: bool, minimum: int = 1) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return str(value)


def _seconds(name: str, value: Any, *, allow_zero: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def validate(base: Options | None = None, **given: Any) -> Options:
    """Check ``given`` options (on top of ``base``) and return them as ``Options``."""
    checked: dict[str, Any] = {}
    for name, value in given.items():
        checked[name] = _check(name, value)
    if base is None:
        if checked.get("workers") is None:
            checked["workers"] = usable_cpus()
            checked["fit_cluster"] = True
        options = Options(**checked)
    else:
        options = replace(base, **checked)
    _check_cluster(options)
    return options


def _check_cluster(options: Options) -> None:
    """``address``/``client`` name a cluster: only for the engines that run on one."""
    for name in ("address", "client"):
        if getattr(options, name) is not None and options.backend not in CLUSTER_BACKENDS:
            engines = "backend='dask'" if name == "client" else "backend='dask' or 'ray'"
            raise ValueError(f"{name}= is for {engines}, not backend={options.backend!r}")
    if options.client is not None and options.address is not None:
        raise ValueError("give client= or address=, not both (the client has an address)")


def _check(name: str, value: Any) -> Any:
    if name == "workers":
        return _positive_int("workers", value, allow_none=True)
    if name == "backend":
        return _choice("backend", value, BACKENDS)
    if name == "ordered":
        if not isinstance(value, bool):
            raise TypeError(f"ordered must be True or False, got {value!r}")
        return value
    if name == "chunksize":
        if value == "auto":
            return None
        return _positive_int("chunksize", value, allow_none=True)
    if name == "progress":
        if not isinstance(value, bool) and value != "log":
            raise ValueError(f"progress must be True, False or 'log', got {value!r}")
        return value
    if name == "desc":
        if value is not None and not isinstance(value, str):
            raise TypeError(f"desc must be a string, got {type(value).__name__}")
        return value
    if name == "errors":
        return _choice("errors", value, ERROR_MODES)
    if name == "timeout":
        return _seconds("timeout", value, allow_zero=False)
    if name == "retries":
        return _positive_int("retries", value, allow_none=False, minimum=0)
    if name == "retry_delay":
        return _seconds("retry_delay", value, allow_zero=True) or 0.0
    if name == "initializer":
        if value is not None and not callable(value):
            raise TypeError(f"initializer must be callable, got {type(value).__name__}")
        return value
    if name == "initargs":
        if value is None:
            return ()
        if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
            raise TypeError(f"initargs must be a tuple, got {type(value).__name__}")
        return tuple(value)
    if name == "max_tasks_per_worker":
        return _positive_int("max_tasks_per_worker", value, allow_none=True)
    if name == "address":
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise TypeError(f"address must be a cluster address string, got {value!r}")
        return value
    if name == "client":
        module = type(value).__module__.partition(".")[0]
        if value is not None and (module != "distributed" or not hasattr(value, "submit")):
            raise TypeError(f"client must be a distributed.Client, got {type(value).__name__}")
        return value
    raise TypeError(f"unexpected keyword argument {name!r}")  # pragma: no cover
