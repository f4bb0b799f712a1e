"""Backends: where tasks run. ``create`` maps a ``backend=`` name to an implementation.

The distributed engines (dask, ray) are optional extras, imported only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # workers import this package and need none of it
    from multitrack.backends._base import Backend

NAMES = ("process", "thread", "serial", "dask", "ray")
#: what each backend can honour, for the options that need it (``_options.OPTIONS``):
#: ``timeout`` needs a task to be stoppable or abandonable, ``max_tasks_per_worker`` workers
#: that are ours to replace, ``start_method`` processes we start, ``memory_limit`` worker
#: processes of our own to measure and stop, ``address``/``client`` a cluster to attach to
CAPABILITIES: dict[str, frozenset[str]] = {
    "process": frozenset({"timeout", "max_tasks_per_worker", "start_method", "memory_limit"}),
    "thread": frozenset({"timeout", "max_tasks_per_worker"}),
    "serial": frozenset(),
    "dask": frozenset({"timeout", "address", "client"}),
    "ray": frozenset({"timeout", "address"}),
}
#: the engines that run on a cluster: optional extras, each with its install command
CLUSTER_EXTRAS = {"dask": ("distributed", "dask"), "ray": ("ray", "ray")}


def create(
    name: str,
    workers: int,
    *,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    max_tasks_per_worker: int | None = None,
    start_method: str | None = None,
    address: str | None = None,
    client: Any = None,
    fit_cluster: bool = False,
    memory_limit: int | str | None = None,
) -> Backend:
    """A new, not yet started backend called ``name`` (one of ``NAMES``).

    ``address``/``client`` (dask, ray only) name the cluster to attach to; ``fit_cluster``:
    ``workers`` was not given, so on a cluster we attach to, use all of its CPUs;
    ``memory_limit`` (process only): bytes per worker, or ``"auto"`` (sampled, not limited)."""
    if name != "process" or start_method == "fork":
        from multitrack.backends import _start

        _start.drop_prestarted()  # a zygote started ahead, which this call has no use for
    options: dict[str, Any] = {
        "initializer": initializer,
        "initargs": initargs,
        "max_tasks_per_worker": max_tasks_per_worker,
    }
    if name == "process":
        from multitrack.backends._process import ProcessBackend

        return ProcessBackend(
            workers, start_method=start_method, memory_limit=memory_limit, **options
        )
    if name == "thread":
        from multitrack.backends._thread import ThreadBackend

        return ThreadBackend(workers, **options)
    if name == "serial":
        from multitrack.backends._serial import SerialBackend

        return SerialBackend(workers, **options)
    if name in CLUSTER_EXTRAS:
        _require(name)
        if name == "dask":
            from multitrack.backends._dask import DaskBackend

            return DaskBackend(
                workers, address=address, client=client, fit_cluster=fit_cluster, **options
            )
        from multitrack.backends._ray import RayBackend

        return RayBackend(workers, address=address, fit_cluster=fit_cluster, **options)
    raise ValueError(f"backend={name!r} is not one of {', '.join(map(repr, NAMES))}")


def _require(name: str) -> None:
    """Check the engine's extra is installed, before anything of it is imported."""
    import importlib.util

    module, extra = CLUSTER_EXTRAS[name]
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f'backend="{name}" needs the optional {module!r} package: '
            f'pip install "multitrack[{extra}]"',
            name=module,
        )
