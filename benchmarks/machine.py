"""What the numbers were measured on: CPU, cores, memory, OS, Python, library versions, load.

Collected by the runner at the start of a benchmark run (and the load average again at the
end), printed in the report's header. The load average is there because a busy machine makes
every number worse: repeats are interleaved so that load hits all contenders alike, but a
reader should know it was there.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata

import psutil

__all__ = ["LIBRARIES", "Machine", "describe_machine", "load_average", "usable_cpus"]

#: distribution names whose versions the report lists
LIBRARIES = (
    "multitrack",
    "joblib",
    "mpire",
    "pebble",
    "tqdm",
    "mmengine-lite",
    "numpy",
    "opencv-python-headless",
    "psutil",
)


@dataclass
class Machine:
    """The header of the report."""

    cpu: str
    logical_cpus: int
    usable_cpus: int
    ram_gb: float
    os: str
    python: str
    start_method: str
    versions: dict[str, str]
    started: str
    load_start: str
    load_end: str = field(default="")
    multitrack: str = field(default="")  # which code: see benchmarks.source


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask): the default number of workers."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> str:
    """``1.23 / 0.98 / 0.50`` (1, 5 and 15 minutes), or ``"n/a"``."""
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def describe_machine() -> Machine:
    """This machine, now."""
    return Machine(
        cpu=_cpu_model(),
        logical_cpus=os.cpu_count() or 1,
        usable_cpus=usable_cpus(),
        ram_gb=psutil.virtual_memory().total / 2**30,
        os=f"{platform.system()} {platform.release()} ({_distribution()})",
        python=f"{platform.python_implementation()} {platform.python_version()}",
        start_method=multiprocessing.get_start_method(),
        versions={name: _version(name) for name in LIBRARIES},
        started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        load_start=load_average(),
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _distribution() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "?")
    except OSError:
        return "?"


def _version(name: str) -> str:
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
    if name == "joblib":  # it vendors loky, whose version matters as much
        try:
            from joblib.externals import loky  # type: ignore[import-untyped,unused-ignore]

            version += f" (loky {loky.__version__})"
        except ImportError:
            pass
    return version
