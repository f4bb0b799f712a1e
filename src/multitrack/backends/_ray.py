"""The Ray backend: each chunk is one Ray task; the scheduler's policy stays in ``_run``.

::

    Run ─submit─▶ RayBackend ── run_chunk_stream.remote(fn_ref, args) ──▶ Ray ── worker
                     ▲    │                                                         │
                     │    └─ ray.wait(in flight, ≤ 0.5 s) ◀── "started", then bytes ◀┘
                     └──── Completed | Lost events

* **Task-level API only** (``ray.remote`` + ``ray.wait``), not ``ray.util.multiprocessing.Pool``
  or ``ActorPool``: those return a dead actor's error *as a value* or end the iterator early.
* **No hidden retries**: tasks are declared ``max_retries=0, retry_exceptions=False``, so a
  dead worker surfaces at once as ``WorkerCrashedError`` and multitrack's own ``retries``
  apply, as on every backend. A single-item chunk whose worker died is that item's
  ``WorkerCrashed``; for a larger chunk the culprit is unknown (the driver does not see item
  boundaries), so every item is re-run alone and a second death is charged exactly.
* **Bounded in flight**: at most ``PER_SLOT`` chunks per slot (one running, one queued in Ray
  behind it, so no worker waits for the driver's round trip between chunks).
* **Deadlines from the real start**: each task is a *streaming* task that yields a "started"
  marker once its items begin to run, then the result. A chunk waiting for a CPU, or for Ray
  to boot a fresh worker process (a second or more after a kill), is not timed; counting from
  submission would time those waits and fail innocent items.
* **Timeouts are real kills**: ``ray.cancel(task, force=True)`` kills the worker process
  running the chunk; Ray starts a fresh one.
* **Function shipped once** per call (``ray.put``); workers unpickle it once per process.
* **Never hangs**: every wait is bounded by half a second, and a watchdog raises
  ``WorkerStartError`` when the cluster has had no CPU to run a task on for ``NO_CPU_GRACE``.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from multitrack._errors import WorkerStartError
from multitrack.backends import _cluster, _wire
from multitrack.backends._base import (
    Backend,
    Chunk,
    Event,
    Lost,
    Output,
    Running,
    completed_from_outcomes,
)

# Loaded by name and typed Any: mypy checks this module the same with or without the extra.
ray: Any = importlib.import_module("ray")
importlib.import_module("ray.exceptions")

# Chunks in flight per slot: one running, one queued in Ray behind it, so a worker never
# waits for the driver's round trip between chunks.
PER_SLOT = 2
# Longest single wait: bounds Ctrl-C latency and the watchdog's period.
WATCH_INTERVAL = 0.5
# How long the cluster may have no CPU at all (every node gone, or none ever joined) before
# the call fails instead of waiting for one.
NO_CPU_GRACE = 60.0
# How long the end of an aborted call waits for its cancelled chunks to be gone.
CANCEL_GRACE = 5.0


@dataclass(eq=False)
class _Flight:
    chunk: Chunk
    task: Any  # ray.ObjectRefGenerator of run_chunk_stream
    positions: list[int]  # chunk positions the remote task runs
    started: float | None = None  # when its "started" marker arrived
    pid: int | None = None  # of the worker process running it, from that marker


class RayBackend(Backend):
    """Chunks as Ray tasks, on the session of this process or one we start."""

    can_kill = True
    times_chunks_only = True

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        max_tasks_per_worker: int | None = None,
        address: str | None = None,
        fit_cluster: bool = False,
    ) -> None:
        if max_tasks_per_worker is not None:
            raise ValueError(
                "max_tasks_per_worker is not supported with backend='ray' (Ray reuses its "
                "worker processes as it sees fit); use backend='process'"
            )
        self.slots = workers
        self._workers = workers
        self._address = address
        self._fit_cluster = fit_cluster
        self._initializer = initializer
        self._initargs = initargs
        self._init_key = _cluster.new_key()
        self._owned = False  # we called ray.init, so we call ray.shutdown
        self._owned_instance = False  # ... and it started a local instance, not a connection
        self._connected = False
        self._remote: Any = None
        self._shipment: Any = None  # ray.ObjectRef of this call's shipment
        self._flights: dict[Any, _Flight] = {}  # task -> flight
        self._by_chunk: dict[int, Any] = {}  # chunk id -> task
        self._events: list[Event] = []
        self._output: Output = _print_through
        self._logs_were_enabled: bool | None = None
        self._no_cpu_since: float | None = None
        self._next_watch = 0.0
        self._closed = False

    # -- call lifecycle -------------------------------------------------------------------

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this pool is closed")
        shipment = _cluster.ship(
            _cluster.new_key(), self._init_key, fn, self._initializer, self._initargs
        )
        self._connect()
        self._output = output
        self._quiet(True)
        self._shipment = ray.put(shipment)
        if self._fit_cluster and not self._owned_instance:
            self.slots = max(1, int(ray.cluster_resources().get("CPU", 0)))

    def end(self, *, abort: bool) -> None:
        if abort and self._flights:
            for task in self._flights:
                _cancel(task)
            # Wait (bounded) until they are really gone: Ray reuses a worker for the next task
            # of this driver, and a kill that lands late would hit the next call's chunk.
            _drain(list(self._flights), time.monotonic() + CANCEL_GRACE)
        self._flights.clear()
        self._by_chunk.clear()
        self._events.clear()
        self._shipment = None
        self._quiet(False)

    def close(self, *, kill: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.end(abort=True)
        if self._owned and ray.is_initialized():
            self._quiet(True)  # the raylet reports the workers it reaps on the way out
            try:
                ray.shutdown()
            finally:
                self._quiet(False)
        self._owned = False

    def _connect(self) -> None:
        if self._connected and ray.is_initialized():
            return
        self._owned_instance = False
        if ray.is_initialized():
            self._check_same_cluster()
        else:
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
        self._remote = ray.remote(_cluster.run_chunk_stream).options(
            num_returns="streaming", num_cpus=1, max_retries=0, retry_exceptions=False
        )
        self._connected = True

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

    # -- scheduling -----------------------------------------------------------------------

    def capacity(self) -> int:
        return max(0, PER_SLOT * self.slots - len(self._flights))

    def submit(self, chunk: Chunk) -> None:
        payload, failures = _cluster.pack_args(chunk.args)
        self._send(chunk, payload, failures)

    def _send(self, chunk: Chunk, payload: Any, failures: list[Any]) -> None:
        if failures:
            self._events.extend(completed_from_outcomes(chunk.id, failures, 0.0))
        failed = {position for position, _, _ in failures}
        positions = [p for p in range(len(chunk.indices)) if p not in failed]
        if not positions:
            return
        task = self._remote.remote(self._shipment, payload)
        self._flights[task] = _Flight(chunk, task, positions)
        self._by_chunk[chunk.id] = task

    def running(self) -> list[Running]:
        return [
            Running(f.chunk.id, f.chunk.id, f.positions[0], f.started)
            for f in self._flights.values()
            if f.started is not None
        ]

    def kill(self, worker: int) -> None:
        task = self._by_chunk.get(worker)
        for _ in range(2):  # its marker, then its result, may be waiting to be read
            if task not in self._flights or not ray.wait([task], timeout=0)[0]:
                break
            self._take(task)  # it finished just now: no kill (it would hit the next task)
        if task not in self._flights:
            return
        flight = self._flights.pop(task)
        del self._by_chunk[worker]
        _cancel(task)
        self._events.append(_lost(flight, killed=True))

    # -- waiting --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if self._events:
            timeout = 0.0
        bound = WATCH_INTERVAL if timeout is None else min(timeout, WATCH_INTERVAL)
        tasks = list(self._flights)
        if tasks:
            ready, rest = ray.wait(tasks, num_returns=1, timeout=bound, fetch_local=True)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=True)
                ready.extend(more)
            for task in ready:
                self._take(task)
        elif bound > 0:
            time.sleep(bound)
        self._watch()
        events, self._events = self._events, []
        return events

    def _take(self, task: Any) -> None:
        """The next thing a task yielded: its "started" marker, its result, or its death."""
        flight = self._flights.get(task)
        if flight is None:
            return
        data: bytes | None
        try:
            data = ray.get(next(task))
        except StopIteration:  # ended without a result: not run_chunk_stream's way
            data = None
        except ray.exceptions.TaskCancelledError:
            data = None  # not by us (we forget what we cancel): run it again
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
            data = None
        if data is not None and data.startswith(_cluster.STARTED):
            flight.started = time.monotonic()
            flight.pid = int(data[len(_cluster.STARTED) :])
            return
        del self._flights[task], self._by_chunk[flight.chunk.id]
        if data is None:
            self._events.append(_lost(flight, killed=False))
        else:
            self._on_result(flight, data)

    def _on_result(self, flight: _Flight, data: bytes) -> None:
        self._events.extend(_cluster.on_result("Ray", flight.chunk, data, self._output, self._send))

    def _watch(self) -> None:
        """Fail instead of waiting forever on a cluster that cannot run anything."""
        now = time.monotonic()
        if now < self._next_watch or self._shipment is None:  # only while a call runs
            return
        self._next_watch = now + WATCH_INTERVAL
        if ray.cluster_resources().get("CPU", 0) >= 1:
            self._no_cpu_since = None
            return
        if self._no_cpu_since is None:
            self._no_cpu_since = now
        elif now - self._no_cpu_since > NO_CPU_GRACE:
            raise WorkerStartError(
                f"the Ray cluster has had no CPU for {NO_CPU_GRACE:g} s: no node that could "
                "run a task (each needs 1 CPU) is alive, so nothing can run"
            )


def _lost(flight: _Flight, *, killed: bool) -> Lost:
    """A chunk whose worker is gone. One item: it was that item. More: the culprit is not
    known (``running=None``), and the scheduler re-runs each item alone."""
    chunk_id = flight.chunk.id
    running = (chunk_id, flight.positions[0]) if len(flight.positions) == 1 else None
    return Lost(chunk_id, [chunk_id], running, None, flight.pid, killed)


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


def _print_through(text: str, stream: str) -> None:
    import sys

    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(text)
    out.flush()
