"""The task functions every contender runs: one importable module, one argument per call.

Every library under test gets exactly these functions, imported by name in its workers (the
harness puts the repository root on ``PYTHONPATH``), so the work per task is identical and the
only thing that differs between contenders is how tasks travel and how workers are managed.

Each function takes **one** argument, because that is the shape every peer accepts alike
(mmengine passes one task, mpire unpacks tuples and dicts into ``*args``/``**kwargs``, the
others take ``fn(x)``). Workload (a) therefore packs its two paths into ``ResizeJob``, a frozen
dataclass rather than a tuple, which mpire would unpack.

====================  ========================  ==========================================
workload              function                  one task
====================  ========================  ==========================================
(a) images            ``resize_image``          read a PNG, resize to 200x200, write a JPEG
(b) trivial           ``identity``              return the argument
(c) cpu, (d) skewed   ``spin``                  pure-Python loop of ``iterations`` steps
(e) big inputs        ``array_sum``             8 MB array in, a float out
(f) big outputs       ``make_array``            an int in, an 8 MB array out
====================  ========================  ==========================================

numpy and OpenCV are imported inside the functions that need them, so the light workloads do
not pay for importing them in every worker.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "ARRAY_ITEMS",
    "IMAGE_SIZE",
    "CpuTimed",
    "ResizeJob",
    "Traced",
    "array_sum",
    "identity",
    "make_array",
    "resize_image",
    "spin",
]

#: (width, height) of every output JPEG, as in the seed example
IMAGE_SIZE = (200, 200)
#: float64 items in one 8 MB array (workloads e and f)
ARRAY_ITEMS = 1 << 20

_opencv_pinned = False

T = TypeVar("T")


class CpuTimed(Generic[T]):
    """``fn`` that also says how much CPU time the call took in its thread: ``(result,
    seconds)``. That is the work itself, whatever library runs it, and none of what the
    library spends around it (sending, receiving, its own threads, its parent process), so
    ``benchmarks.one`` can tell the two apart. A plain class of this module: every library
    pickles it by reference, as it does the functions."""

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn = fn

    def __call__(self, arg: Any) -> tuple[T, float]:
        started = time.thread_time()
        result = self.fn(arg)
        return result, time.thread_time() - started


class Traced(Generic[T]):
    """``fn`` that also says where and when it ran: ``(result, cpu seconds, start, end, pid,
    thread id)``, start and end on ``time.monotonic`` (one clock for every process of the
    machine). ``benchmarks.cpu`` learns from it which processes and threads ran tasks, how much
    CPU they took, and how long a call took to return after its last task ended."""

    def __init__(self, fn: Callable[[Any], T]) -> None:
        self.fn = fn

    def __call__(self, arg: Any) -> tuple[T, float, float, float, int, int]:
        started, cpu = time.monotonic(), time.thread_time()
        result = self.fn(arg)
        cpu, ended = time.thread_time() - cpu, time.monotonic()
        return result, cpu, started, ended, os.getpid(), threading.get_native_id()


@dataclass(frozen=True)
class ResizeJob:
    """One image to resize: where to read it and where to write the JPEG."""

    src: str
    dst: str


def resize_image(job: ResizeJob) -> str:
    """The seed example for one image; returns the JPEG's file name.

    OpenCV is held to one thread in every process that runs this (the loop included), so the
    for-loop is a true one-core baseline and N workers do not oversubscribe the machine;
    the call is made here, not in an initializer, because not every peer has one.
    """
    import cv2

    global _opencv_pinned
    if not _opencv_pinned:
        cv2.setNumThreads(1)
        _opencv_pinned = True
    image = cv2.imread(job.src)
    if image is None:
        raise OSError(f"cv2.imread could not read {job.src!r}")
    small = cv2.resize(image, IMAGE_SIZE, interpolation=cv2.INTER_AREA)
    if not cv2.imwrite(job.dst, small):
        raise OSError(f"cv2.imwrite could not write {job.dst!r}")
    return os.path.basename(job.dst)


def identity(value: int) -> int:
    """The cheapest possible task: what is left is the library's per-task overhead."""
    return value


def spin(iterations: int) -> int:
    """Pure-Python CPU work that holds the GIL, about ``iterations`` * 50 ns."""
    total = 0
    for step in range(iterations):
        total += step * step % 7
    return total


def array_sum(array: npt.NDArray[np.float64]) -> float:
    """Large input, scalar output: the cost is moving 8 MB to the worker (the sum reads every
    byte, so a library that shares the array instead of copying it pays for the reads)."""
    return float(array.sum())


def make_array(value: int) -> npt.NDArray[np.float64]:
    """Small input, large output: the cost is moving 8 MB back to the caller."""
    import numpy as np

    return np.full(ARRAY_ITEMS, float(value))
