"""Backends: where tasks run. ``create`` maps a ``backend=`` name to an implementation.

The distributed engines (dask, ray) are optional extras, imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # workers import this package and need none of it
    from multitrack.backends._base import Backend

NAMES = ("process", "thread", "serial")


def create(
    name: str,
    workers: int,
    *,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_worker: int | None = None,
) -> Backend:
    """A new, not yet started backend called ``name`` (one of ``NAMES``)."""
    options: dict[str, Any] = {
        "initializer": initializer,
        "initargs": initargs,
        "max_tasks_per_worker": max_tasks_per_worker,
    }
    if name == "process":
        from multitrack.backends._process import ProcessBackend

        return ProcessBackend(workers, **options)
    if name == "thread":
        from multitrack.backends._thread import ThreadBackend

        return ThreadBackend(workers, **options)
    if name == "serial":
        from multitrack.backends._serial import SerialBackend

        return SerialBackend(workers, **options)
    raise ValueError(f"backend={name!r} is not one of {', '.join(map(repr, NAMES))}")
