"""The seed example: resize images on every core with mmengine's ``track_parallel_progress``.

This is the job as people write it today. mmengine hands the function ONE argument per task, so
a function of several arguments needs the wrapper trick below (``unpack``: a decorator that
calls ``fn(*task)``), and the tasks become a list of tuples.

multitrack ships a drop-in with the same signature and results: change only the import line
(or pass ``--multitrack``, which does exactly that) and the same script runs on multitrack.
``seed_multitrack.py`` is the same job written for ``multitrack.map``, without the wrapper.

Run (each prints a digest of its results; equal digests mean equal results, in order):

    python examples/seed_mmengine.py                  # 100 synthetic images, mmengine
    python examples/seed_mmengine.py --multitrack     # the same, multitrack's drop-in
    python examples/seed_mmengine.py path/to/images --nproc 4
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import cv2
from common import digest, input_images, usable_cpus

# Moving this script to multitrack changes one line, the import of track_parallel_progress:
#     from mmengine.utils import track_parallel_progress    # today
#     from multitrack import track_parallel_progress        # multitrack's drop-in
# The --multitrack flag picks the second one without editing the file.
if "--multitrack" in sys.argv:
    from multitrack import track_parallel_progress
else:
    from mmengine.utils import track_parallel_progress  # type: ignore[import-untyped,no-redef]

R = TypeVar("R")


def unpack(fn: Callable[..., R]) -> Callable[[tuple[Any, ...]], R]:
    """mmengine passes one argument per task: make ``fn(a, b, c)`` take the tuple ``(a, b, c)``."""

    @functools.wraps(fn)  # keeps the name `run`, so the wrapper still pickles by reference
    def wrapper(args: tuple[Any, ...]) -> R:
        return fn(*args)

    return wrapper


@unpack
def run(index: int, path: str, out_dir: str) -> tuple[str, int]:
    """Read ``path``, resize it to 200x200, write ``out_dir/{index}.jpg``; return the file name
    and the sum of its pixels (to compare runs)."""
    cv2.setNumThreads(1)  # one OpenCV thread per worker: nproc workers share nproc cores
    image = cv2.imread(path)
    if image is None:  # cv2.imread does not raise on a missing or broken file
        raise OSError(f"cannot read {path}")
    small = cv2.resize(image, (200, 200), interpolation=cv2.INTER_AREA)
    name = f"{index:05d}.jpg"
    cv2.imwrite(os.path.join(out_dir, name), small)
    return name, int(small.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", help="images to resize (default: synthetic ones)")
    parser.add_argument("--images", type=int, default=100, help="how many synthetic images")
    parser.add_argument("--nproc", type=int, default=usable_cpus(), help="worker processes")
    parser.add_argument("--multitrack", action="store_true", help="use multitrack's drop-in")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="seed-") as scratch:
        paths = input_images(args.folder, args.images, scratch)
        out_dir = os.path.join(scratch, "out")
        os.makedirs(out_dir)
        tasks = list(zip(range(len(paths)), paths, [out_dir] * len(paths), strict=True))
        started = time.perf_counter()
        results = track_parallel_progress(run, tasks, nproc=args.nproc)
        elapsed = time.perf_counter() - started

    library = "multitrack" if args.multitrack else "mmengine"
    print(f"{library}: resized {len(results)} images in {elapsed:.2f} s (nproc={args.nproc})")
    print(f"digest: {len(results)} results, {digest(results)}")


if __name__ == "__main__":
    main()
