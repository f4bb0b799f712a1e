"""multitrack: run a function over many inputs on every core, with a true progress bar.

Example:
    >>> import multitrack as mt
    >>> mt.map(abs, [-1, -2, 3], progress=False)
    [1, 2, 3]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from multitrack._errors import (
    CheckpointError,
    MemoryLimitExceeded,
    MultitrackError,
    RemoteError,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
    WorkerStartError,
)

if TYPE_CHECKING:
    from multitrack._api import Pool, imap, map, starmap
    from multitrack._mmengine import track_iter_progress, track_parallel_progress, track_progress

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "MemoryLimitExceeded",
    "MultitrackError",
    "Pool",
    "RemoteError",
    "TaskError",
    "TaskTimeout",
    "WorkerCrashed",
    "WorkerStartError",
    "imap",
    "map",
    "starmap",
    "track_iter_progress",
    "track_parallel_progress",
    "track_progress",
]

# The calls are imported on first use: worker processes import this package too, and they
# need none of the parent side (the scheduler, tqdm), which would add to every worker's start.
_LAZY = {
    "Pool": "multitrack._api",
    "imap": "multitrack._api",
    "map": "multitrack._api",
    "starmap": "multitrack._api",
    "track_iter_progress": "multitrack._mmengine",
    "track_parallel_progress": "multitrack._mmengine",
    "track_progress": "multitrack._mmengine",
}


def _public(obj: Any) -> Any:
    """Show a public name as ``multitrack.X`` in reprs and tracebacks."""
    if getattr(obj, "__module__", "").startswith("multitrack."):
        obj.__module__ = "multitrack"
    return obj


for _error in (
    CheckpointError,
    MemoryLimitExceeded,
    MultitrackError,
    RemoteError,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
    WorkerStartError,
):
    _public(_error)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'multitrack' has no attribute {name!r}")
    if _LAZY[name] == "multitrack._api":  # a call is coming: its workers' zygote boots now
        from multitrack.backends._start import prestart

        prestart()
    value = _public(getattr(importlib.import_module(_LAZY[name]), name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
