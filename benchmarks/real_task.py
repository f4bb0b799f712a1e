"""The task of workload (g): a function in a module that imports OpenCV and numpy at import time.

Workload (g) is the path real scripts take (issue 13): a script imports numpy and cv2 at its
top, then calls a parallel map several times with a function from a module of its own that
imports them too (mmdet's and mmseg's dataset converters do exactly this). Every worker that
starts as a fresh interpreter imports this module, and with it OpenCV and numpy (about
0.1-0.2 s each time on the 2-core machine); a forked worker has them already. That import is
the point of the workload, so it happens here, at the top, not inside the function as in
``benchmarks.tasks``.

One task (``blur``): build a 256x256 colour image from a seed, blur it ``rounds`` times with
OpenCV and return ``(seed, checksum)``; ``plan`` picks ``rounds`` so that a task takes about
5 ms on this machine. The image depends only on ``seed % VARIANTS``, so the child checks all
results against ``VARIANTS`` reference values it computes itself after the timer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["TASK_TARGET_S", "VARIANTS", "Blur", "blur", "calibrate_rounds"]

TASK_TARGET_S = 0.005  # one task
VARIANTS = 4  # distinct images: seed % VARIANTS
SIDE = 256

cv2.setNumThreads(1)  # one core per process, loop included (as ``tasks.resize_image`` does)


@dataclass(frozen=True)
class Blur:
    """One task: which image, and how many blurs (a dataclass, so mpire does not unpack it)."""

    seed: int
    rounds: int


def blur(job: Blur) -> tuple[int, int]:
    """``(seed, checksum)`` of the image of ``seed`` blurred ``rounds`` times."""
    variant = job.seed % VARIANTS
    ramp = np.arange(SIDE, dtype=np.uint8)
    image = np.dstack([np.add.outer(ramp, ramp * (variant + 1)).astype(np.uint8)] * 3)
    for _ in range(job.rounds):
        image = cv2.GaussianBlur(image, (7, 7), 0)
    return job.seed, int(image.sum(dtype=np.int64))


def calibrate_rounds(target_s: float = TASK_TARGET_S) -> int:
    """Blur rounds for a task of about ``target_s`` on this machine (best of 5 probes of 20
    rounds, so that noise cannot shorten the tasks); done once in the runner."""
    probe = 20
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        blur(Blur(0, probe))
        best = min(best, time.perf_counter() - started)
    return max(1, round(target_s / (best / probe)))
