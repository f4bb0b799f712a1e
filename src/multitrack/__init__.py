"""multitrack: run a function over many inputs on every core, with a true progress bar.

Example:
    >>> import multitrack as mt
    >>> mt.map(abs, [-1, -2, 3], progress=False)
    [1, 2, 3]
"""

from multitrack._api import Pool, imap, map, starmap
from multitrack._errors import (
    MultitrackError,
    RemoteError,
    TaskError,
    TaskTimeout,
    WorkerCrashed,
    WorkerStartError,
)
from multitrack._mmengine import track_iter_progress, track_parallel_progress, track_progress

__version__ = "0.1.0"

__all__ = [
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

# Show public names as ``multitrack.X`` in reprs and tracebacks, not ``multitrack._api.X``.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("multitrack."):
        try:
            _obj.__module__ = "multitrack"
        except (AttributeError, TypeError):  # pragma: no cover - builtins
            pass
del _name, _obj
