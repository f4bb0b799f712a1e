"""Large buffers cross the process boundary in shared memory: correct, writable, and nothing
left behind (no file descriptors, nothing in /dev/shm), even after a crash."""

from __future__ import annotations

import os

import numpy as np
import pytest

import faults
import multitrack as mt
from multitrack.backends import _channel

pytestmark = [
    pytest.mark.skipif(not _channel.SHARED_MEMORY, reason="needs memfd (Linux)"),
    pytest.mark.usefixtures("each_start_method"),
]

MB8 = 1_000_000  # float64 elements: 8 MB


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _dev_shm() -> set[str]:
    """Shared memory files, less multiprocessing's semaphores (``sem.mp-*``): multitrack makes
    none, and other programs on a shared machine make them at any time."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


def test_large_arrays_round_trip_both_ways() -> None:
    arrays = [np.arange(MB8, dtype=np.float64) * i for i in range(6)]
    sums = mt.map(faults.array_sum, arrays, workers=2)
    assert sums == [float(a.sum()) for a in arrays]
    made = mt.map(faults.make_array, range(6), workers=2)
    for i, array in enumerate(made):
        assert array.shape == (MB8,) and array.dtype == np.float64
        assert array[0] == i and array[-1] == i
        array[0] = -1.0  # results are ordinary, writable arrays
        assert array[0] == -1.0


def test_mixed_small_and_large_buffers_in_one_chunk() -> None:
    inputs = [np.ones(10), np.ones(MB8), b"x" * 10, bytearray(300_000), np.ones((3, 4))]
    assert mt.map(faults.nbytes, inputs, workers=2, chunksize=5) == [
        np.asarray(x).nbytes if not isinstance(x, bytes | bytearray) else len(x) for x in inputs
    ]


def test_no_descriptor_or_shm_file_is_left_behind_even_after_a_crash() -> None:
    shm_before = _dev_shm()
    mt.map(faults.array_sum, [np.ones(MB8)] * 4, workers=2)  # warm up imports and caches
    fds_before = _open_fds()
    for _ in range(3):
        mt.map(faults.array_sum, [np.ones(MB8)] * 8, workers=2)
        results = mt.map(
            faults.sigkill_on_array, [np.full(MB8, i) for i in range(6)], workers=2, errors="return"
        )
        assert isinstance(results[3], mt.WorkerCrashed)
    assert _open_fds() <= fds_before
    assert _dev_shm() <= shm_before
