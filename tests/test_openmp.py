"""A fork after a GNU OpenMP parallel region hangs at the child's own first region (libgomp
does not rebuild its pool): neither the zygote nor the caller is forked then.

Each case runs as a script of its own: a process that ran a region keeps libgomp's threads for
good, and the test process forks its workers in other tests. The region is libgomp's own entry
point called through ctypes with a C function as its body (``getpid``), as torch's and
scikit-learn's compiled code calls it: no Python runs in OpenMP's threads.
"""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import pytest

from multitrack.backends import _platform
from scripts import run_script

pytestmark = [
    pytest.mark.skipif(ctypes.util.find_library("gomp") is None, reason="no libgomp here"),
    pytest.mark.skipif(not _platform.CAN_FORK, reason="fork is not used here"),
    pytest.mark.timeout(90),
]

OMP_MODULE = '''
import ctypes

_gomp = ctypes.CDLL("libgomp.so.1")
_body = ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p)
_gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]


def parallel(x):
    """x, after an OpenMP parallel region of 4 threads."""
    _gomp.GOMP_parallel(_body, None, 4, 0)
    return x


parallel(0)  # at import, as a model built at module level: the pool's threads now exist
'''


@pytest.fixture
def omp_module(tmp_path: Path) -> Path:
    (tmp_path / "omp_at_import.py").write_text(OMP_MODULE)
    return tmp_path


def test_the_threads_of_openmps_pool_are_counted(omp_module: Path) -> None:
    out = run_script(
        omp_module,
        """
        import ctypes, threading, time
        from multitrack.backends._native import openmp_threads

        stop = threading.Event()
        sleeper = threading.Thread(target=stop.wait)  # a thread outside libgomp
        sleeper.start()
        ctypes.CDLL("libgomp.so.1")
        print(openmp_threads())  # libgomp loaded, no region run: no pool
        import omp_at_import
        time.sleep(0.2)  # the pool sleeps in libgomp now
        print(openmp_threads())
        stop.set()
        sleeper.join()
        """,
    )
    assert out.split() == ["0", "3"]


def test_workers_of_the_default_start_do_not_hang(omp_module: Path) -> None:
    # The zygote imports the function's module, which runs a region: a fork of it would
    # wait forever in the first task's region. Its workers start as fresh interpreters.
    out = run_script(
        omp_module,
        """
        import multitrack as mt
        import omp_at_import

        print(mt.map(omp_at_import.parallel, [1, 2, 3], workers=2, timeout=20))
        """,
    )
    assert out.strip() == "[1, 2, 3]"


def test_a_fork_of_the_caller_is_refused_after_a_region(omp_module: Path) -> None:
    out = run_script(
        omp_module,
        """
        import multitrack as mt
        import omp_at_import

        try:
            mt.map(omp_at_import.parallel, [1], workers=1, start_method="fork", timeout=20)
        except mt.WorkerStartError as error:
            print("refused", "OpenMP" in str(error) and "start_method='spawn'" in str(error))
        """,
    )
    assert out.strip() == "refused True"


def test_the_drop_in_starts_fresh_workers_after_a_region(omp_module: Path) -> None:
    out = run_script(
        omp_module,
        """
        import warnings
        import multitrack as mt
        import omp_at_import

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            done = mt.track_parallel_progress(omp_at_import.parallel, [1, 2, 3], 2)
        print(done, any("OpenMP" in str(w.message) for w in caught))
        """,
    )
    assert out.strip().splitlines()[-1] == "[1, 2, 3] True"
