"""``multitrack demo``: the seed job (resize images) as a for-loop and through ``mt.map``.

What one demo run does::

    make_images ──▶ tmp/in/00000.png ...          (untimed; threads, pre-compressed bands)
        │
        ├─ timed: for i, path in enumerate(paths): resize_one(i, path, tmp/loop)
        ├─ timed: mt.map(resize_one, range(n), paths)  ──▶ tmp/multitrack/
        │
        └─ compare tmp/loop with tmp/multitrack, then report the speedup

Everything lives in one ``tempfile.TemporaryDirectory``: it is removed on success, on an error
and on Ctrl-C alike.

Fairness: OpenCV runs its own thread pool inside some calls (``cv2.resize`` among them), so a
"serial" loop left at OpenCV's defaults can be secretly parallel, and N workers that each start
a pool of N threads oversubscribe the machine. Both runs therefore use one OpenCV thread per
process (``single_thread_opencv``; the workers run it as their initializer), so the loop is a
true one-core baseline and the speedup is what multitrack adds. Measured on the 2-core dev
machine (1024x768 images): per image, ``cv2.imread`` takes 13.4 ms (PNG decoding is
single-threaded in OpenCV anyway), ``cv2.resize`` 3.1 ms with one thread and no less with two,
and the JPEG write 0.2 ms; the loop over 300 images took the same 5-6 s with OpenCV's default
threads as with one. So on 2 cores the pinning changes nothing for this job; on a machine with
many cores OpenCV's threads would speed up the loop's resizes and flatter the baseline.

numpy and OpenCV (the ``demo`` extra) are imported inside the functions, so importing this
module, and the CLI, works without them; ``require_extra`` says clearly when they are missing.

Example:
    >>> import io
    >>> from multitrack import _demo
    >>> log = io.StringIO()
    >>> report = _demo.run_demo(images=4, workers=2, size=(64, 48), out=log, progress=False)
    >>> report.images, report.workers, "speedup" in log.getvalue()
    (4, 2, True)
"""

from __future__ import annotations

import functools
import os
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TextIO

import multitrack as mt

# Loaded now rather than by the first mt.map: the timed run should not pay for imports the
# for-loop does not need, and a Ctrl-C landing while those modules build their dataclasses
# (CPython runs the generated methods through exec() of a string) makes CPython 3.11 end the
# process with SIGINT at exit, even though the KeyboardInterrupt was handled: exit -2, not 130.
import multitrack._api
import multitrack.backends._process
from multitrack.backends._platform import usable_cpus

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "EXTRA_MESSAGE",
    "DemoMismatch",
    "DemoReport",
    "make_images",
    "require_extra",
    "resize_one",
    "run_demo",
    "single_thread_opencv",
]

EXTRA_MESSAGE = 'multitrack demo needs the demo extra: pip install "multitrack[demo]"'
#: (width, height) of every output JPEG
OUTPUT_SIZE = (200, 200)
_OUTPUT = f"{OUTPUT_SIZE[0]}x{OUTPUT_SIZE[1]}"

# Synthetic PNGs are stacked from horizontal bands of this many rows, each compressed once in
# VARIANTS versions: image i picks a variant per band, so every image has its own pixels while
# making one costs a file write and two checksums, not a zlib compression (~100 ms each).
BAND_ROWS = 32
VARIANTS = 4
NOISE = 48  # noise amplitude per channel: enough entropy that decoding is real inflate work
# Other work using more than this many of our CPUs during the runs earns a note in the report.
BUSY_NOTE_CPUS = 0.3
# A for-loop shorter than this (seconds) may lose to starting the workers: the report says so.
SHORT_RUN_S = 1.0
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ZLIB_HEADER = b"\x78\x01"  # deflate, 32 KiB window, fastest level
_FINAL_EMPTY_BLOCK = b"\x03\x00"  # ends the deflate stream after the bands' flushed blocks


class DemoMismatch(RuntimeError):
    """The for-loop and ``mt.map`` produced different outputs."""


class _Band(NamedTuple):
    raw: bytes  # filtered scanlines (filter byte 0 + pixels), for the adler32 of the stream
    deflated: bytes  # raw deflate blocks ending on a full flush: they concatenate freely


@dataclass(frozen=True)
class DemoReport:
    """Timings of one demo run.

    Example:
        >>> DemoReport(images=4, workers=2, cpus=2, serial_s=2.0, parallel_s=1.0).speedup
        2.0
    """

    images: int
    workers: int
    cpus: int
    serial_s: float
    parallel_s: float
    #: CPUs that other work (other programs, the hypervisor) kept busy on average during the
    #: two runs; ``None`` where it cannot be measured (no /proc/stat)
    busy_elsewhere: float | None = None

    @property
    def speedup(self) -> float:
        """How many times faster ``mt.map`` was than the for-loop."""
        return self.serial_s / self.parallel_s

    @property
    def ideal(self) -> int:
        """The best speedup possible: one per CPU, at most one per worker."""
        return min(self.workers, self.cpus)

    @property
    def efficiency(self) -> float:
        """The speedup as a fraction of the ideal one."""
        return self.speedup / self.ideal


def require_extra() -> None:
    """Import OpenCV and numpy, or raise ``ImportError`` carrying ``EXTRA_MESSAGE``.

    Example:
        >>> require_extra()  # silent when ``multitrack[demo]`` is installed
    """
    try:
        import cv2  # noqa: F401
        import numpy  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{EXTRA_MESSAGE}\n(import failed: {error})") from error


def single_thread_opencv() -> None:
    """Limit OpenCV to one thread in this process (see the module docstring for why).

    Example:
        >>> single_thread_opencv()
    """
    import cv2

    cv2.setNumThreads(1)


def resize_one(index: int, path: str, out_dir: str) -> str:
    """The seed job for one image: read ``path``, resize it to 200x200, write
    ``out_dir/{index}.jpg``; return that file's name.

    Module-level so that worker processes import it by name.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     [path] = make_images(Path(tmp), 1, (64, 48))
        ...     resize_one(0, path, tmp)
        '00000.jpg'
    """
    import cv2

    image = cv2.imread(path)
    if image is None:
        raise OSError(f"cv2.imread could not read {path!r}")
    small = cv2.resize(image, OUTPUT_SIZE, interpolation=cv2.INTER_AREA)
    name = f"{index:05d}.jpg"
    if not cv2.imwrite(os.path.join(out_dir, name), small):
        raise OSError(f"cv2.imwrite could not write {name!r} into {out_dir!r}")
    return name


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[str]:
    """Write ``count`` distinct PNGs of ``size`` (width, height) into ``folder``, fast.

    The pixels are gradients plus noise, so the files do not compress much and reading them
    is real work. Deterministic for a given ``seed``. Returns the paths, in order.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     paths = make_images(Path(tmp, "in"), 3, (64, 48))
        ...     [os.path.relpath(path, tmp) for path in paths]
        ['in/00000.png', 'in/00001.png', 'in/00002.png']
    """
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = [_bands(_synthetic_pixels(size, rng)) for _ in range(VARIANTS)]
    picks = _variant_picks(count, len(pool[0]), rng)
    header = _png_header(*size)
    paths = [str(folder / f"{index:05d}.png") for index in range(count)]
    images = ([pool[variant][band] for band, variant in enumerate(row)] for row in picks)
    # Writing and checksumming release the GIL: threads make this about twice as fast.
    executor = ThreadPoolExecutor(max_workers=min(8, usable_cpus()))
    try:
        list(executor.map(functools.partial(_write_png, header=header), paths, images))
    finally:  # on Ctrl-C, drop the queued images instead of writing them all first
        executor.shutdown(wait=True, cancel_futures=True)
    return paths


def _variant_picks(count: int, bands: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Which variant each band of each image uses: random-looking, but no two images alike
    (as long as ``VARIANTS ** bands`` allows: tiny images have few bands)."""
    import numpy as np

    picks = rng.integers(0, VARIANTS, size=(count, bands))
    codes = np.arange(count)
    # Write each image's index in base VARIANTS into a few randomly chosen bands (shifted by
    # a random offset per band): two images then differ in at least one of those bands.
    for band in rng.permutation(bands):
        if not codes.any():
            break
        picks[:, band] = (codes + rng.integers(0, VARIANTS)) % VARIANTS
        codes //= VARIANTS
    return picks


def _synthetic_pixels(size: tuple[int, int], rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """One (height, width, 3) image: colour gradients with a random tint, plus noise."""
    import numpy as np

    width, height = size
    across = np.linspace(0, 255, width, dtype=np.uint8)[np.newaxis, :]
    down = np.linspace(0, 255, height, dtype=np.uint8)[:, np.newaxis]
    tint = rng.integers(0, 256, size=3, dtype=np.uint8)
    # uint8 sums wrap around (mod 256); the table scales them down so that noise cannot overflow
    scale = (np.arange(256) * (256 - NOISE) // 256).astype(np.uint8)
    channels = [scale[across + tint[0]], scale[down + tint[1]], scale[across + down + tint[2]]]
    image = np.stack(np.broadcast_arrays(*channels), axis=-1)
    return image + rng.integers(0, NOISE, size=image.shape, dtype=np.uint8)


def _bands(pixels: npt.NDArray[np.uint8]) -> list[_Band]:
    """Cut an image into PNG scanline bands and compress each one on its own."""
    import numpy as np

    height = pixels.shape[0]
    filter_bytes = np.zeros((height, 1), dtype=np.uint8)  # filter type 0 on every row
    scanlines = np.concatenate([filter_bytes, pixels.reshape(height, -1)], axis=1)
    bands = []
    for top in range(0, height, BAND_ROWS):
        raw = scanlines[top : top + BAND_ROWS].tobytes()
        compressor = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        bands.append(_Band(raw, compressor.compress(raw) + compressor.flush(zlib.Z_FULL_FLUSH)))
    return bands


def _png_header(width: int, height: int) -> bytes:
    """PNG signature and IHDR chunk of an 8-bit RGB image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _PNG_SIGNATURE + _chunk(b"IHDR", ihdr)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _write_png(path: str, bands: Sequence[_Band], header: bytes) -> None:
    """Write one PNG whose IDAT is the zlib stream made of ``bands``, without joining them."""
    adler = 1
    for band in bands:
        adler = zlib.adler32(band.raw, adler)
    pieces = [_ZLIB_HEADER, *(band.deflated for band in bands), _FINAL_EMPTY_BLOCK]
    pieces.append(struct.pack(">I", adler))
    crc = zlib.crc32(b"IDAT")
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    with open(path, "wb") as file:
        file.write(header)
        file.write(struct.pack(">I", sum(map(len, pieces))) + b"IDAT")
        file.writelines(pieces)
        file.write(struct.pack(">I", crc) + _chunk(b"IEND", b""))


def run_demo(
    images: int,
    workers: int | None = None,
    size: tuple[int, int] = (1024, 768),
    out: TextIO | None = None,
    *,
    progress: bool = True,
) -> DemoReport:
    """Run the demo and print its report to ``out`` (default stdout); ``progress``: show
    ``mt.map``'s bar.

    Raises ``DemoMismatch`` if the two runs wrote different files.

    Example:
        >>> run_demo(images=8, workers=2, size=(64, 48), progress=False)
        multitrack demo: resize 8 synthetic 64x48 PNGs to 200x200 JPEGs
        ...
        DemoReport(images=8, workers=2, cpus=..., serial_s=..., parallel_s=...)
    """
    out = out or sys.stdout
    cpus = usable_cpus()
    workers_used = workers or cpus  # what mt.map picks when not told
    width, height = size
    title = f"resize {images} synthetic {width}x{height} PNGs to {_OUTPUT} JPEGs"
    _say(out, f"multitrack demo: {title}")
    with tempfile.TemporaryDirectory(prefix="multitrack-demo-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        paths = make_images(root / "in", images, size)
        made_s = time.perf_counter() - started
        _say(out, f"  (made the PNGs in {made_s:.1f} s, untimed; OpenCV: 1 thread per process)")
        loop_label, map_label = _labels(workers_used)
        clock_before = _CpuClock.now()
        _say(out, f"  {loop_label}: ", end="")
        serial_s, serial_names = _time_loop(paths, root / "loop")
        _say(out, f"{serial_s:.2f} s")
        parallel_s, parallel_names = _time_map(paths, root / "multitrack", workers, progress)
        _say(out, f"  {map_label}: {parallel_s:.2f} s")
        busy_elsewhere = _CpuClock.busy_elsewhere(clock_before, _CpuClock.now())
        _check_same(serial_names, parallel_names, root / "loop", root / "multitrack")
    report = DemoReport(images, workers_used, cpus, serial_s, parallel_s, busy_elsewhere)
    for line in _summary(report):
        _say(out, line)
    return report


def _labels(workers: int) -> tuple[str, str]:
    """The two timing labels, padded to the same width."""
    plural = "" if workers == 1 else "s"
    labels = ("for-loop", f"multitrack ({workers} worker{plural})")
    width = max(map(len, labels))
    return labels[0].ljust(width), labels[1].ljust(width)


def _summary(report: DemoReport) -> list[str]:
    """The closing lines: speedup against the ideal, and a note when the machine was busy."""
    plural = "" if report.workers == 1 else "s"
    where = (
        "on this machine"
        if report.ideal == report.cpus
        else f"with {report.workers} worker{plural}"
    )
    lines = [
        f"  speedup: {report.speedup:.2f}x  (ideal {where}: {report.ideal:.2f}x, "
        f"efficiency {report.efficiency:.0%})",
        f"  outputs: {report.images} JPEGs, the same from both runs",
    ]
    if report.speedup < 1 and report.serial_s < SHORT_RUN_S:
        lines.append(
            f"  note: the whole job took {report.serial_s:.2f} s in a loop, less than starting "
            "the workers; try more --images"
        )
    machine_cpus = os.cpu_count() or report.cpus
    busy = report.busy_elsewhere
    if busy is not None and machine_cpus - busy < report.ideal - BUSY_NOTE_CPUS:
        lines.append(
            f"  note: other work kept about {busy:.1f} of this machine's {machine_cpus} CPUs busy"
        )
        lines.append("        during the runs, so expect a higher speedup on an idle machine")
    return lines


class _CpuClock(NamedTuple):
    """CPU seconds spent so far by the whole machine (all CPUs) and by this process (with its
    finished children: the workers of a returned ``mt.map``), and the wall clock."""

    machine_busy: float
    own: float
    wall: float

    @classmethod
    def now(cls) -> _CpuClock | None:
        """Read the clocks; ``None`` where the machine's CPU times are unknown (no /proc)."""
        try:
            with open("/proc/stat") as stat:
                ticks = [int(field) for field in stat.readline().split()[1:9]]
            ticks_per_second = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, AttributeError):
            return None
        # user nice system idle iowait irq softirq steal: busy is all but idle and iowait
        busy = sum(ticks) - ticks[3] - ticks[4]
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        return cls(busy / ticks_per_second, own, time.perf_counter())

    @staticmethod
    def busy_elsewhere(before: _CpuClock | None, after: _CpuClock | None) -> float | None:
        """How many CPUs, on average, something other than this demo kept busy in between."""
        if before is None or after is None or after.wall <= before.wall:
            return None
        wall = after.wall - before.wall
        machine = (after.machine_busy - before.machine_busy) / wall
        return max(0.0, machine - (after.own - before.own) / wall)


def _time_loop(paths: Sequence[str], out_dir: Path) -> tuple[float, list[str]]:
    """The baseline: a plain for-loop in this process. Returns (seconds, file names)."""
    out_dir.mkdir()
    single_thread_opencv()
    started = time.perf_counter()
    names = []
    for index, path in enumerate(paths):
        names.append(resize_one(index, path, str(out_dir)))
    return time.perf_counter() - started, names


def _time_map(
    paths: Sequence[str], out_dir: Path, workers: int | None, progress: bool = True
) -> tuple[float, list[str]]:
    """The same job through ``mt.map``; the time includes starting the workers."""
    out_dir.mkdir()
    job = functools.partial(resize_one, out_dir=str(out_dir))
    started = time.perf_counter()
    names: list[str] = mt.map(
        job,
        range(len(paths)),
        paths,
        workers=workers,
        desc="resize",
        initializer=single_thread_opencv,
        progress=progress,
    )
    return time.perf_counter() - started, names


def _check_same(names_a: list[str], names_b: list[str], dir_a: Path, dir_b: Path) -> None:
    """Both runs returned the same names and wrote byte-identical JPEGs (same OpenCV, same
    pixels, one thread each: any difference is a bug, not rounding)."""
    files_a = sorted(path.name for path in dir_a.iterdir())
    files_b = sorted(path.name for path in dir_b.iterdir())
    if names_a != names_b or files_a != files_b or sorted(names_a) != files_a:
        raise DemoMismatch(f"the two runs wrote different files ({len(files_a)} vs {len(files_b)})")
    differing = [name for name in files_a if not _same_bytes(dir_a / name, dir_b / name)]
    if differing:
        raise DemoMismatch(f"{len(differing)} outputs differ between the runs, e.g. {differing[0]}")


def _same_bytes(path_a: Path, path_b: Path) -> bool:
    return path_a.read_bytes() == path_b.read_bytes()


def _say(out: TextIO, text: str, end: str = "\n") -> None:
    print(text, end=end, file=out, flush=True)
