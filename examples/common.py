"""Shared by the seed examples: their input images and a digest of their results.

Not part of the job itself: the examples import it so that each one shows only the job.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def input_images(folder: str | None, count: int, scratch: str) -> list[str]:
    """The images in ``folder`` (sorted), or ``count`` synthetic ones made in ``scratch``.

    Example:
        >>> input_images(None, 2, "/tmp/x")  # doctest: +SKIP
        ['/tmp/x/in/00000.png', '/tmp/x/in/00001.png']
    """
    if folder is not None:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
        return [os.path.join(folder, name) for name in names]
    return make_images(os.path.join(scratch, "in"), count)


def make_images(folder: str, count: int, seed: int = 0) -> list[str]:
    """Write ``count`` noisy 640x480 PNGs into ``folder``, the same ones for the same ``seed``.

    Example:
        >>> make_images("/tmp/images", 3)  # doctest: +SKIP
        ['/tmp/images/00000.png', '/tmp/images/00001.png', '/tmp/images/00002.png']
    """
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{index:05d}.png") for index in range(count)]
    with ThreadPoolExecutor() as executor:  # cv2.imwrite releases the GIL
        list(executor.map(_write_png, paths, range(count), [seed] * count))
    return paths


def _write_png(path: str, index: int, seed: int) -> None:
    image = np.random.default_rng([seed, index]).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    if not cv2.imwrite(path, image, [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write {path}")


def digest(results: Sequence[Any]) -> str:
    """A short fingerprint of the results, equal for equal results in equal order.

    Example:
        >>> digest([("00000.jpg", 12345)])
        'c53b034a30025f19'
    """
    return hashlib.sha256(repr(list(results)).encode()).hexdigest()[:16]


def usable_cpus() -> int:
    """CPUs this process may run on.

    Example:
        >>> usable_cpus() >= 1
        True
    """
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
