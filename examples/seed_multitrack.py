"""The seed example on multitrack: resize images on every core with ``multitrack.map``.

The same job as ``seed_mmengine.py``, written the way Python's ``map`` reads: one iterable per
argument, a plain function, no wrapper to unpack tuples, no ``nproc`` to choose (the default is
one worker per usable CPU), a live progress bar on stderr.

Run (prints the same digest as ``seed_mmengine.py`` for the same images):

    python examples/seed_multitrack.py                  # 100 synthetic images
    python examples/seed_multitrack.py path/to/images --workers 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import cv2
from common import digest, input_images

import multitrack as mt


def run(index: int, path: str, out_dir: str) -> tuple[str, int]:
    """Read ``path``, resize it to 200x200, write ``out_dir/{index}.jpg``; return the file name
    and the sum of its pixels (to compare runs)."""
    cv2.setNumThreads(1)  # one OpenCV thread per worker: N workers share N cores
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
    parser.add_argument("--workers", type=int, default=None, help="worker processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="seed-") as scratch:
        paths = input_images(args.folder, args.images, scratch)
        out_dir = os.path.join(scratch, "out")
        os.makedirs(out_dir)
        started = time.perf_counter()
        results = mt.map(
            run, range(len(paths)), paths, [out_dir] * len(paths), workers=args.workers
        )
        elapsed = time.perf_counter() - started

    print(f"multitrack: resized {len(results)} images in {elapsed:.2f} s")
    print(f"digest: {len(results)} results, {digest(results)}")


if __name__ == "__main__":
    main()
