"""A fork after a GNU OpenMP parallel region hangs at the child's own first region (libgomp
does not rebuild its pool): before the zygote or the caller is forked, the pool is asked to let
its threads go (``omp_pause_resource_all``), and where it cannot, neither is forked.

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


# The same, where the pool cannot be released (a libgomp before GCC 9, without
# omp_pause_resource_all): wherever it is imported, the caller or the zygote, no libgomp is
# found to ask.
UNRELEASABLE_MODULE = (
    "from multitrack.backends import _native\n_native._libgomp_paths = lambda: []\n" + OMP_MODULE
)


@pytest.fixture
def omp_module(tmp_path: Path) -> Path:
    (tmp_path / "omp_at_import.py").write_text(OMP_MODULE)
    (tmp_path / "omp_unreleasable.py").write_text(UNRELEASABLE_MODULE)
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
        from multitrack.backends._native import release_openmp
        print(release_openmp())  # the pool let go of its threads
        print(omp_at_import.parallel(7), openmp_threads() > 0)  # a region makes a new one
        stop.set()
        sleeper.join()
        """,
    )
    assert out.split() == ["0", "3", "0", "7", "True"]


@pytest.mark.parametrize(
    ("module", "forked"), [("omp_at_import", True), ("omp_unreleasable", False)]
)
def test_workers_of_the_default_start_do_not_hang(
    omp_module: Path, module: str, forked: bool
) -> None:
    # The zygote imports the function's module, which runs a region: a fork of it would
    # wait forever in the first task's region. Its pool lets go of its threads and workers
    # are forks of it; where the pool cannot, they are fresh interpreters.
    out = run_script(
        omp_module,
        f"""
        import multitrack as mt
        from multitrack.backends import _zygote
        from {module} import parallel

        print(mt.map(parallel, [1, 2, 3], workers=2, timeout=20))
        print([zygote.usable for zygote in _zygote._zygotes.values()])
        """,
    )
    assert out.splitlines() == ["[1, 2, 3]", f"[{forked}]"]


def test_a_fork_of_the_caller_after_a_region_releases_the_pool(omp_module: Path) -> None:
    out = run_script(
        omp_module,
        """
        import multitrack as mt
        import omp_at_import

        print(mt.map(omp_at_import.parallel, [1, 2], workers=2, start_method="fork", timeout=20))
        print(omp_at_import.parallel(3))  # the caller's own next region: a new pool
        """,
    )
    assert out.splitlines() == ["[1, 2]", "3"]


def test_a_fork_of_the_caller_is_refused_when_the_pool_holds_on(omp_module: Path) -> None:
    out = run_script(
        omp_module,
        """
        import multitrack as mt
        import omp_unreleasable

        try:
            mt.map(omp_unreleasable.parallel, [1], workers=1, start_method="fork", timeout=20)
        except mt.WorkerStartError as error:
            print("refused", "OpenMP" in str(error) and "start_method='spawn'" in str(error))
        """,
    )
    assert out.strip() == "refused True"


@pytest.mark.parametrize(
    ("module", "warned"), [("omp_at_import", False), ("omp_unreleasable", True)]
)
def test_the_drop_in_forks_after_a_region_it_can_release(
    omp_module: Path, module: str, warned: bool
) -> None:
    # mmengine's own fork would hang here; the drop-in forks once the pool let go, and
    # starts fresh workers (saying so) when it cannot.
    out = run_script(
        omp_module,
        f"""
        import warnings
        import multitrack as mt
        from {module} import parallel

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            done = mt.track_parallel_progress(parallel, [1, 2, 3], 2)
        print(done, any("OpenMP" in str(w.message) for w in caught))
        """,
    )
    assert out.strip().splitlines()[-1] == f"[1, 2, 3] {warned}"
