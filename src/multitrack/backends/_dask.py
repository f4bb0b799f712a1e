"""The dask backend: the engine hooks of ``ClusterBackend`` (``_cluster_backend``) for dask.

::

    Run ─submit─▶ DaskBackend ── client.submit(run_chunk, shipment, args, pure=False) ──▶
                     ▲    │                               scheduler ──▶ worker (thread)
                     │    └─ distributed.wait(in flight, FIRST_COMPLETED, ≤ 0.5 s) ◀─ bytes
                     └──── Completed | Lost events

* **One chunk per worker thread in flight** (``capacity``): the scheduler then always places a
  new chunk on the thread that just became free, so (a) submission time is the chunk's start
  time, for deadlines (``starts_on_submit``), and (b) a worker that dies was running exactly
  the one chunk of ours it held, which makes blame exact. The cost is one driver round trip (a
  few ms) between chunks on each worker, against chunks of ~50 ms.
* **Deaths**: a worker death fails the chunk it was running with ``KilledWorker`` once dask's
  ``allowed-failures`` is exhausted. On a cluster multitrack starts we set it to 0 (no hidden
  retries: multitrack's ``retries`` apply, and the failure is seen at once); on a cluster we
  attach to it is the cluster's setting (dask's default 3: a task that kills its worker is tried
  on 4 workers before we hear of it). dask blames *every* task assigned to the dead worker, so
  ``KilledWorker``s from one worker are gathered for ``GATHER`` seconds: a lone single-item
  chunk is that item's ``WorkerCrashed``; several chunks, or a chunk of several items, mean
  the culprit is unknown, and the scheduler re-runs each item alone.
* **Timeouts are best effort**: dask cannot stop a running task. ``kill`` cancels the chunk's
  future (the caller gets ``TaskTimeout`` at once) and has the worker's nanny restart the
  worker process in the background (1-2 s; 5-6 s when the task ignores the nanny's polite
  stop, as ``time.sleep`` does); until it is back, its slot is not reused. Without a nanny the
  task runs on and its thread stays out of use; when no thread is left, the call fails.
* **Results**: read and released at once (a result left on a worker would be recomputed if that
  worker died later).
* **Watchdog**: the call fails when the cluster has had no worker for ``NO_WORKER_GRACE``.

Which cluster, whose it is, which of its threads are usable, restarts and quiet logging:
``_dask_cluster``. Flights, waiting, blame and relaying: ``_cluster_backend``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from multitrack._errors import WorkerStartError
from multitrack.backends import _cluster, _wire
from multitrack.backends._base import Event
from multitrack.backends._cluster_backend import ClusterBackend, ClusterFlight
from multitrack.backends._dask_cluster import DaskCluster, distributed

# How long the cluster may have no worker before the call fails instead of waiting.
NO_WORKER_GRACE = 60.0
# How long KilledWorker errors from one dead worker are gathered before they are judged.
GATHER = 0.05


class DaskBackend(ClusterBackend):
    """Chunks as dask tasks, on a client we are given, find, or start."""

    backend_name = engine = "dask"
    no_task_limit = "dask workers are long-lived processes it manages"
    starts_on_submit = True

    def __init__(self, workers: int, *, client: Any = None, **options: Any) -> None:
        super().__init__(workers, **options)
        self._cluster = DaskCluster(workers, self._address, client)
        self._client: Any = None  # the cluster's client, once connected
        # dead worker -> (when to judge, the flights it took): see ``_gather_death``
        self._dead: dict[str, tuple[float, list[ClusterFlight]]] = {}
        self._submitted = 0

    # -- the cluster ----------------------------------------------------------------------

    def _connect(self) -> None:
        self._cluster.connect()
        self._client = self._cluster.client

    def _quiet(self, on: bool) -> None:
        self._cluster.quiet(on)

    def _cluster_size(self) -> int | None:
        if self._cluster.local is not None:
            return None
        return sum(self._client.nthreads().values())  # type: ignore[no-any-return]

    def _shut_down(self) -> None:
        self._cluster.close()
        self._client = None

    def _starved(self) -> tuple[float, str] | None:
        if self._client.nthreads():
            return None
        return NO_WORKER_GRACE, (
            f"the dask cluster at {self._client.scheduler.address} has had no worker for "
            f"{NO_WORKER_GRACE:g} s, so nothing can run"
        )

    # -- scheduling -----------------------------------------------------------------------

    def capacity(self) -> int:
        return max(0, min(self.slots, self._cluster.usable_threads()) - len(self._flights))

    def _launch(self, payload: Any) -> Any:
        self._submitted += 1
        # No strict worker restrictions: a chunk pinned to a worker that then dies would wait
        # forever. The scheduler places no task on a closing worker, and ``capacity`` keeps
        # one chunk per live thread. Only a worker still running a task we could not stop
        # (no nanny) looks idle to the scheduler: then ask for the others, as a preference.
        restrictions: dict[str, Any] = {}
        if self._cluster.held:
            free = list(self._cluster.free_threads())
            restrictions = {"workers": free, "allow_other_workers": True}
        return self._client.submit(
            _cluster.run_chunk,
            self._shipment,
            payload,
            pure=False,
            key=f"multitrack-chunk-{self._init_key[:8]}-{self._submitted}",
            **restrictions,
        )

    # -- stopping -------------------------------------------------------------------------

    def _may_kill(self, flight: ClusterFlight) -> bool:
        if not self._queued_behind(flight):
            return True
        # Its deadline counted from submission, but it waits on a worker behind an earlier
        # chunk of ours (placed there while a worker restarted): it has not started. Count
        # from now instead of killing it.
        flight.started = time.monotonic()
        return False

    def _queued_behind(self, flight: ClusterFlight) -> bool:
        try:
            processing = self._client.processing()
        except Exception:
            return False
        by_key = {f.handle.key: f for f in self._flights.values()}
        started = flight.started or 0.0  # set at submission, on dask
        for keys in processing.values():
            if flight.handle.key in keys:
                return any(
                    (other.started or 0.0) < started and other is not flight
                    for other in (by_key.get(k) for k in keys)
                    if other is not None
                )
        return False

    def _cancel(self, flight: ClusterFlight) -> None:
        self._cluster.stop([flight.handle], restart=True, output=self._output)
        flight.handle.release()

    def _abandon(self, flights: list[ClusterFlight], *, abort: bool) -> None:
        futures = [flight.handle for flight in flights]
        if abort and futures:
            # Only on a cluster of our own are workers restarted to stop what runs there;
            # on a shared one the cancelled chunks run to their end (dask cannot stop them).
            own = self._cluster.local is not None
            self._cluster.stop(futures, restart=own, output=self._output)
        for future in futures:
            future.release()
        self._dead.clear()
        self._cluster.held.clear()

    # -- waiting --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> Sequence[Event]:
        events = super().poll(timeout)
        if self._cluster.held and not self._flights and not events and self.capacity() == 0:
            raise WorkerStartError(
                "every dask worker thread is held by a timed-out task that dask cannot stop "
                "(its worker has no nanny to restart it), so nothing can run"
            )
        return events

    def _wait(self, bound: float) -> None:
        if self._dead:  # wake up to judge the gathered deaths
            judge_at = min(at for at, _ in self._dead.values())
            bound = max(0.0, min(bound, judge_at - time.monotonic()))
        super()._wait(bound)
        self._judge_deaths()

    def _ready(self, bound: float) -> list[Any]:
        try:
            with self._client.as_current():  # wait() asks for "the" client
                futures = list(self._flights)
                done, _ = distributed.wait(futures, bound, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        return list(done)

    def _read(self, flight: ClusterFlight) -> None:
        future = flight.handle
        status = future.status
        if status == "finished":
            try:
                data = future.result()
            except Exception:  # lost between "finished" and the fetch
                data = None
            finally:
                future.release()
            self._finish(flight, data)
            return
        error = future.exception() if status == "error" else None
        future.release()
        self._drop(flight)
        if isinstance(error, distributed.KilledWorker):
            self._gather_death(flight, error.last_worker)
        elif error is not None:
            raise WorkerStartError(
                f"multitrack's chunk runner failed on a dask worker: {_wire.describe(error)} "
                "(is multitrack installed where the workers run?)"
            ) from error
        else:  # cancelled, but not by us (the scheduler restarted, the client reconnected)
            self._events.append(flight.lost(killed=False, known=False))

    def _gather_death(self, flight: ClusterFlight, worker: Any) -> None:
        """Hold ``flight`` with the others its dead worker took, to be judged together."""
        address = getattr(worker, "address", str(worker))
        _, lost = self._dead.setdefault(address, (time.monotonic() + GATHER, []))
        lost.append(flight)
        flight.pid = getattr(worker, "pid", None)
        self._cluster.recount()  # that worker is gone

    def _judge_deaths(self) -> None:
        """Report the chunks of dead workers once their ``KilledWorker``s are all in."""
        now = time.monotonic()
        for worker, (judge_at, lost) in list(self._dead.items()):
            if now < judge_at:
                continue
            del self._dead[worker]
            alone = len(lost) == 1
            for flight in lost:
                self._events.append(flight.lost(killed=False, known=alone))
