"""The Ray backend: the engine hooks of ``ClusterBackend`` (``_cluster_backend``) for Ray.

::

    Run ─submit─▶ RayBackend ── run_chunk_stream.remote(fn_ref, args) ──▶ Ray ── worker
                     ▲    │                                                         │
                     │    └─ ray.wait(in flight, ≤ 0.5 s) ◀── "started", then bytes ◀┘
                     └──── Completed | Lost events

* **Task-level API only** (``ray.remote`` + ``ray.wait``), not ``ray.util.multiprocessing.Pool``
  or ``ActorPool``: those return a dead actor's error *as a value* or end the iterator early.
* **No hidden retries**: tasks are declared ``max_retries=0, retry_exceptions=False``, so a
  dead worker surfaces at once as ``WorkerCrashedError`` and multitrack's own ``retries``
  apply, as on every backend.
* **Bounded in flight**: at most ``PER_SLOT`` chunks per slot (one running, one queued in Ray
  behind it, so no worker waits for the driver's round trip between chunks).
* **Deadlines from the real start**: each task is a *streaming* task that yields a "started"
  marker once its items begin to run, then the result. A chunk waiting for a CPU, or for Ray
  to boot a fresh worker process (a second or more after a kill), is not timed; counting from
  submission would time those waits and fail innocent items.
* **Timeouts are real kills**: ``ray.cancel(task, force=True)`` kills the worker process
  running the chunk; Ray starts a fresh one.
* **Function shipped once** per call (``ray.put``); workers unpickle it once per process.
* **Watchdog**: the call fails when the cluster has had no CPU to run a task on for
  ``NO_CPU_GRACE``.
* **Quiet**: while a call runs, Ray's driver-side printing of worker logs and "(raylet) A
  worker died" messages is off (the caller gets a ``WorkerCrashed`` instead); prints of the
  task itself are captured on the worker and shown above the bar.

Cluster choice (``_connect``): the Ray session already initialised in this process; else
``address=`` or ``RAY_ADDRESS`` (we connect, and disconnect at ``close``); else a new local
instance of ``workers`` CPUs, shut down at ``close``.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from typing import Any

from multitrack._errors import WorkerStartError
from multitrack.backends import _cluster, _wire
from multitrack.backends._cluster_backend import ClusterBackend, ClusterFlight

# Loaded by name and typed Any: mypy checks this module the same with or without the extra.
ray: Any = importlib.import_module("ray")
importlib.import_module("ray.exceptions")

# Chunks in flight per slot: one running, one queued in Ray behind it, so a worker never
# waits for the driver's round trip between chunks.
PER_SLOT = 2
# How long the cluster may have no CPU at all (every node gone, or none ever joined) before
# the call fails instead of waiting for one.
NO_CPU_GRACE = 60.0
# How long the end of an aborted call waits for its cancelled chunks to be gone.
CANCEL_GRACE = 5.0


class RayBackend(ClusterBackend):
    """Chunks as Ray tasks, on the session of this process or one we start."""

    backend_name = "ray"
    engine = "Ray"
    no_task_limit = "Ray reuses its worker processes as it sees fit"

    def __init__(self, workers: int, **options: Any) -> None:
        super().__init__(workers, **options)
        self._owned = False  # we called ray.init, so we call ray.shutdown
        self._owned_instance = False  # ... and it started a local instance, not a connection
        self._connected = False
        self._remote: Any = None
        self._logs_were_enabled: bool | None = None

    # -- the cluster ----------------------------------------------------------------------

    def _connect(self) -> None:
        if self._connected and ray.is_initialized():
            return
        self._owned_instance = False
        if ray.is_initialized():
            self._check_same_cluster()
        else:
            self._init()
        self._remote = ray.remote(_cluster.run_chunk_stream).options(
            num_returns="streaming", num_cpus=1, max_retries=0, retry_exceptions=False
        )
        self._connected = True

    def _init(self) -> None:
        address = self._address or os.environ.get("RAY_ADDRESS") or None
        options: dict[str, Any] = {
            "log_to_driver": False,  # prints come back with the chunk (see _cluster)
            "logging_level": logging.ERROR,
        }
        if address is None:
            address = "local"
            options.update(num_cpus=self._workers, include_dashboard=False)
            self._owned_instance = True
        try:
            ray.init(address=address, **options)
        except Exception as exc:
            where = "a local Ray instance" if address == "local" else f"Ray at {address!r}"
            raise WorkerStartError(
                f"could not start or reach {where}: {_wire.describe(exc)}"
            ) from exc
        self._owned = True

    def _check_same_cluster(self) -> None:
        """``address=`` while this process is already connected: it must be that cluster
        (Ray allows one per process)."""
        wanted = self._address
        if not wanted or wanted in ("auto", "local") or wanted.startswith("ray://"):
            return
        current = ray.get_runtime_context().gcs_address
        if wanted.replace("localhost", "127.0.0.1") != current.replace("localhost", "127.0.0.1"):
            raise ValueError(
                f"address={wanted!r}, but this process is already connected to the Ray "
                f"cluster at {current!r} (Ray allows one per process); call ray.shutdown() "
                "first or leave address out"
            )

    def _quiet(self, on: bool) -> None:
        """Turn Ray's driver-side printing of worker and raylet messages off (``on``) or
        back to what it was."""
        worker_module = getattr(getattr(ray, "_private", None), "worker", None)
        if worker_module is None or not hasattr(worker_module, "_worker_logs_enabled"):
            return
        if on and self._logs_were_enabled is None:
            self._logs_were_enabled = worker_module._worker_logs_enabled
            worker_module._worker_logs_enabled = False
        elif not on and self._logs_were_enabled is not None:
            worker_module._worker_logs_enabled = self._logs_were_enabled
            self._logs_were_enabled = None

    def _put(self, shipment: bytes) -> Any:
        return ray.put(shipment)

    def _cluster_size(self) -> int | None:
        return None if self._owned_instance else int(ray.cluster_resources().get("CPU", 0))

    def _shut_down(self) -> None:
        if self._owned and ray.is_initialized():
            ray.shutdown()
        self._owned = False

    def _starved(self) -> tuple[float, str] | None:
        if ray.cluster_resources().get("CPU", 0) >= 1:
            return None
        return NO_CPU_GRACE, (
            f"the Ray cluster has had no CPU for {NO_CPU_GRACE:g} s: no node that could "
            "run a task (each needs 1 CPU) is alive, so nothing can run"
        )

    # -- chunks ---------------------------------------------------------------------------

    def capacity(self) -> int:
        return max(0, PER_SLOT * self.slots - len(self._flights))

    def _launch(self, payload: Any) -> Any:
        return self._remote.remote(self._shipment, payload)

    def _may_kill(self, flight: ClusterFlight) -> bool:
        task = flight.handle
        for _ in range(2):  # its marker, then its result, may be waiting to be read
            if task not in self._flights or not ray.wait([task], timeout=0)[0]:
                break
            self._read(flight)  # it finished just now: no kill (it would hit the next task)
        return task in self._flights

    def _cancel(self, flight: ClusterFlight) -> None:
        _cancel(flight.handle)

    def _abandon(self, flights: list[ClusterFlight], *, abort: bool) -> None:
        if abort and flights:
            tasks = [flight.handle for flight in flights]
            for task in tasks:
                _cancel(task)
            # Wait (bounded) until they are really gone: Ray reuses a worker for the next task
            # of this driver, and a kill that lands late would hit the next call's chunk.
            _drain(tasks, time.monotonic() + CANCEL_GRACE)

    def _ready(self, bound: float) -> list[Any]:
        tasks = list(self._flights)
        ready, rest = ray.wait(tasks, num_returns=1, timeout=bound, fetch_local=True)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=True)
            ready.extend(more)
        return ready  # type: ignore[no-any-return]

    def _read(self, flight: ClusterFlight) -> None:
        """The next thing a task yielded: its "started" marker, its result, or its death."""
        data = _next_message(flight.handle)
        if data is not None and data.startswith(_cluster.STARTED):
            flight.started = time.monotonic()
            flight.pid = int(data[len(_cluster.STARTED) :])
        else:
            self._finish(flight, data)


def _next_message(task: Any) -> bytes | None:
    """What ``task`` yielded next; ``None`` when its worker is gone with it."""
    try:
        return ray.get(next(task))  # type: ignore[no-any-return]
    except StopIteration:  # ended without a result: not run_chunk_stream's way
        return None
    except ray.exceptions.TaskCancelledError:
        return None  # not by us (we forget what we cancel): run it again
    except ray.exceptions.RayTaskError as exc:
        # run_chunk_stream never raises for a task: this is the runner failing to load.
        raise WorkerStartError(
            f"multitrack's chunk runner failed on a Ray worker: {_wire.describe(exc)} "
            "(is multitrack installed where the workers run?)"
        ) from exc
    except ray.exceptions.TaskUnschedulableError as exc:
        raise WorkerStartError(
            f"the Ray cluster cannot run multitrack's tasks: {_wire.describe(exc)}"
        ) from exc
    except ray.exceptions.RayError:
        # WorkerCrashedError, OutOfMemoryError (Ray's memory monitor killed it),
        # NodeDiedError, ObjectLostError...: the worker is gone with the chunk.
        return None


def _drain(tasks: list[Any], deadline: float) -> None:
    """Read what cancelled tasks still yield until each has ended (or ``deadline``)."""
    pending = tasks
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 0.1))
        for task in ready:
            try:
                ray.get(next(task))
            except Exception:  # StopIteration, or the cancellation itself: it has ended
                continue
            pending.append(task)  # an item it yielded before the cancel: read on


def _cancel(task: Any) -> None:
    try:
        ray.cancel(task, force=True)
    except Exception:  # already finished, or the cluster is gone: nothing left to stop
        pass
