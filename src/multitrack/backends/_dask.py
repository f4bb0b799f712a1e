"""The dask backend: each chunk is one ``client.submit`` task; the policy stays in ``_run``.

::

    Run ─submit─▶ DaskBackend ── client.submit(run_chunk, shipment, args, pure=False) ──▶
                     ▲    │                               scheduler ──▶ worker (thread)
                     │    └─ distributed.wait(in flight, FIRST_COMPLETED, ≤ 0.5 s) ◀─ bytes
                     └──── Completed | Lost events

* **One chunk per worker thread in flight** (``capacity``): the scheduler then always places a
  new chunk on the thread that just became free, so (a) submission time is the chunk's start
  time, for deadlines, and (b) a worker that dies was running exactly the one chunk of ours it
  held, which makes blame exact. The cost is one driver round trip (a few ms) between chunks
  on each worker, against chunks of ~50 ms.
* **Deaths**: a worker death fails the chunk it was running with ``KilledWorker`` once dask's
  ``allowed-failures`` is exhausted. On a cluster multitrack starts we set it to 0 (no hidden
  retries: multitrack's ``retries`` apply, and the failure is seen at once); on a cluster we
  attach to it is the cluster's setting (dask's default 3: a task that kills its worker is tried
  on 4 workers before we hear of it). dask blames *every* task assigned to the dead worker, so
  ``KilledWorker``s from one worker are gathered for ``GATHER`` seconds: a lone single-item
  chunk is that item's ``WorkerCrashed``; several chunks, or a chunk of several items, mean
  the culprit is unknown, and the scheduler re-runs each item alone (a second death is then
  charged exactly).
* **Timeouts are best effort**: dask cannot stop a running task. ``kill`` cancels the chunk's
  future (the caller gets ``TaskTimeout`` at once) and asks the worker's nanny to restart the
  worker process, in the background (1-2 s; 5-6 s when the task ignores the nanny's polite
  stop, as ``time.sleep`` does). Until it is back, its slot is not reused. A worker without a
  nanny cannot be restarted: its task runs on, its thread stays out of use for the rest of
  the call (new chunks prefer other workers), and when no thread is left the call fails.
* **Results**: read and released at once (a result left on a worker would be recomputed if that
  worker died later).
* **Never hangs**: every wait is bounded by half a second, and a watchdog raises
  ``WorkerStartError`` when the cluster has had no worker for ``NO_WORKER_GRACE``.
* **Quiet**: the ``distributed`` loggers of this process (the scheduler and nannies of a local
  cluster live here) are disabled while a call runs; task prints come back with the chunk.

Cluster choice (``_connect``): ``client=``; ``address=``; the active client of this process
(``Client.current()``); ``DASK_SCHEDULER_ADDRESS`` (dask's ``scheduler-address`` setting);
else a ``LocalCluster`` of ``workers`` single-threaded worker processes, closed at ``close``.
Only what multitrack started is closed.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing.resource_tracker
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
dask: Any = importlib.import_module("dask")
distributed: Any = importlib.import_module("distributed")

# Longest single wait: bounds Ctrl-C latency and the watchdog's period.
WATCH_INTERVAL = 0.5
# How long the cluster may have no worker before the call fails instead of waiting.
NO_WORKER_GRACE = 60.0
# How long KilledWorker errors from one dead worker are gathered before they are judged.
GATHER = 0.05
# allowed-failures on a cluster multitrack starts (see the module docstring).
OWN_ALLOWED_FAILURES = 0
RESTART_TIMEOUT = 60.0
# How old the driver's view of the cluster's worker threads may be.
THREADS_MAX_AGE = 0.2


@dataclass(eq=False)
class _Flight:
    chunk: Chunk
    future: Any  # distributed.Future
    positions: list[int]  # chunk positions the remote task runs
    started: float
    pid: int | None = None  # of the worker process that died with it, when dask says


class DaskBackend(Backend):
    """Chunks as dask tasks, on a client we are given, find, or start."""

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
        client: Any = None,
        fit_cluster: bool = False,
    ) -> None:
        if max_tasks_per_worker is not None:
            raise ValueError(
                "max_tasks_per_worker is not supported with backend='dask' (dask workers "
                "are long-lived processes it manages); use backend='process'"
            )
        self.slots = workers
        self._workers = workers
        self._address = address
        self._given_client = client
        self._fit_cluster = fit_cluster
        self._initializer = initializer
        self._initargs = initargs
        self._init_key = _cluster.new_key()
        self._client: Any = None
        self._cluster: Any = None  # a LocalCluster we started
        self._owns_client = False
        self._shipment = b""
        self._flights: dict[str, _Flight] = {}  # future key -> flight
        self._by_chunk: dict[int, str] = {}
        self._dead: dict[str, tuple[float, list[_Flight]]] = {}  # worker -> (judge at, lost)
        self._restarting: dict[str, Any] = {}  # worker -> concurrent future of its restart
        # worker -> threads held by timed-out tasks we could not stop (no nanny to restart it)
        self._held: dict[str, int] = {}
        self._threads: dict[str, int] = {}  # worker -> threads, as last asked
        self._threads_checked = -THREADS_MAX_AGE
        self._events: list[Event] = []
        self._output: Output = _print_through
        self._muted: list[logging.Logger] = []
        self._no_worker_since: float | None = None
        self._next_watch = 0.0
        self._submitted = 0
        self._closed = False
        self._started_tracker = False  # our LocalCluster started multiprocessing's tracker

    # -- call lifecycle -------------------------------------------------------------------

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this pool is closed")
        self._shipment = _cluster.ship(
            _cluster.new_key(), self._init_key, fn, self._initializer, self._initargs
        )
        self._output = output
        self._quiet(True)
        self._connect()
        if self._fit_cluster and self._cluster is None:
            self.slots = max(1, sum(self._client.nthreads().values()))
        self._held.clear()

    def end(self, *, abort: bool) -> None:
        flights = list(self._flights.values())
        if abort and flights:
            # Only on a cluster of our own are workers restarted to stop what runs there;
            # on a shared one the cancelled chunks run to their end (dask cannot stop them).
            self._stop(flights, restart=self._cluster is not None)
        for flight in flights:
            flight.future.release()
        self._flights.clear()
        self._by_chunk.clear()
        self._dead.clear()
        self._events.clear()
        self._shipment = b""
        self._quiet(False)

    def close(self, *, kill: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.end(abort=True)
        self._quiet(True)  # closing a cluster logs about the workers it stops
        try:
            for restart in self._restarting.values():
                restart.cancel()
            self._restarting.clear()
            if self._owns_client and self._client is not None:
                self._client.close()
            if self._cluster is not None:
                self._cluster.close()
                if self._started_tracker:
                    _stop_tracker()
        finally:
            self._client = self._cluster = None
            self._quiet(False)

    def _connect(self) -> None:
        if self._client is not None:
            return
        if self._given_client is not None:
            self._client = self._given_client
            return
        try:
            if self._address is not None:
                self._client = distributed.Client(self._address, set_as_default=False)
                self._owns_client = True
                return
            try:
                self._client = distributed.Client.current()
                return
            except ValueError:
                pass
            if dask.config.get("scheduler-address", None):
                self._client = distributed.Client(set_as_default=False)
                self._owns_client = True
                return
        except OSError as exc:
            where = self._address or dask.config.get("scheduler-address", None)
            raise WorkerStartError(
                f"could not reach the dask scheduler at {where!r}: {_wire.describe(exc)}"
            ) from exc
        self._start_local_cluster()

    def _start_local_cluster(self) -> None:
        config = {"distributed.scheduler.allowed-failures": OWN_ALLOWED_FAILURES}
        self._started_tracker = not _tracker_running()
        try:
            with dask.config.set(config):
                self._cluster = distributed.LocalCluster(
                    n_workers=self._workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",  # a free port: 8787 may be taken (and a warning)
                    silence_logs=logging.CRITICAL,
                )
            self._client = distributed.Client(self._cluster, set_as_default=False)
        except Exception as exc:
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None
            raise WorkerStartError(
                f"could not start a local dask cluster: {_wire.describe(exc).rstrip('.')}. "
                "dask starts its workers with 'spawn', which re-imports your script: put the "
                'call under `if __name__ == "__main__":`, or pass client= / address= of a cluster'
            ) from exc
        self._owns_client = True

    def _quiet(self, on: bool) -> None:
        """Disable this process's ``distributed`` loggers (``on``), or re-enable those we
        disabled. A local cluster's scheduler and nannies log here about every worker that
        dies or restarts, which the caller sees as ``WorkerCrashed`` instead."""
        if not on:
            for logger in self._muted:
                logger.disabled = False
            self._muted.clear()
            return
        names = [n for n in logging.root.manager.loggerDict if n.partition(".")[0] == "distributed"]
        for name in ["distributed", *names]:
            logger = logging.getLogger(name)
            if not logger.disabled:
                logger.disabled = True
                self._muted.append(logger)

    # -- scheduling -----------------------------------------------------------------------

    def capacity(self) -> int:
        return max(0, min(self.slots, self._usable_threads()) - len(self._flights))

    def _usable_threads(self) -> int:
        """Worker threads alive and not being restarted (asked at most every
        ``THREADS_MAX_AGE``): while a dead worker is away, fewer chunks go out, so two never
        share a worker and a death is never blamed on a chunk that was only queued there."""
        now = time.monotonic()
        if now >= self._threads_checked + THREADS_MAX_AGE:
            for address, restart in list(self._restarting.items()):
                if restart.done():
                    del self._restarting[address]
            self._threads = {
                address: info.get("nthreads", 1)
                for address, info in self._client.scheduler_info()["workers"].items()
                if info.get("status", "running") == "running"  # not closing or restarting
            }
            self._threads_checked = now
        return sum(self._free_threads().values())

    def _free_threads(self) -> dict[str, int]:
        """Live worker threads not restarting and not held by a task we could not stop."""
        return {
            address: n - self._held.get(address, 0)
            for address, n in self._threads.items()
            if address not in self._restarting and n > self._held.get(address, 0)
        }

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
        self._submitted += 1
        # No strict worker restrictions: a chunk pinned to a worker that then dies would wait
        # forever. The scheduler places no task on a closing worker, and ``capacity`` keeps
        # one chunk per live thread. Only a worker still running a task we could not stop
        # (no nanny) looks idle to the scheduler: then ask for the others, as a preference.
        restrictions: dict[str, Any] = {}
        if self._held:
            restrictions = {"workers": list(self._free_threads()), "allow_other_workers": True}
        future = self._client.submit(
            _cluster.run_chunk,
            self._shipment,
            payload,
            pure=False,
            key=f"multitrack-chunk-{self._init_key[:8]}-{self._submitted}",
            **restrictions,
        )
        self._flights[future.key] = _Flight(chunk, future, positions, time.monotonic())
        self._by_chunk[chunk.id] = future.key

    def running(self) -> list[Running]:
        return [
            Running(f.chunk.id, f.chunk.id, f.positions[0], f.started)
            for f in self._flights.values()
        ]

    def kill(self, worker: int) -> None:
        key = self._by_chunk.get(worker)
        if key is None:
            return
        flight = self._flights[key]
        if self._queued_behind(flight):
            # Its deadline counted from submission, but it waits on a worker behind an
            # earlier chunk of ours (placed there while a worker restarted): it has not
            # started. Count from now instead of killing it.
            flight.started = time.monotonic()
            return
        del self._by_chunk[worker], self._flights[key]
        self._stop([flight], restart=True)
        flight.future.release()
        self._events.append(_lost(flight, killed=True))

    def _queued_behind(self, flight: _Flight) -> bool:
        try:
            processing = self._client.processing()
        except Exception:
            return False
        for keys in processing.values():
            if flight.future.key in keys:
                return any(
                    other.started < flight.started and other is not flight
                    for other in (self._flights.get(k) for k in keys)
                    if other is not None
                )
        return False

    def _stop(self, flights: list[_Flight], *, restart: bool) -> None:
        """Cancel these chunks and (``restart``) restart, through their nannies, the workers
        running them: the only way dask has to stop a running task."""
        keys = {f.future.key for f in flights}
        try:
            processing = self._client.processing() if restart else {}
            nannies = {
                address: info.get("nanny")
                for address, info in self._client.scheduler_info()["workers"].items()
            }
            self._client.cancel([f.future for f in flights], force=True)
        except Exception:  # the scheduler is gone: nothing runs there any more
            return
        for address, running in processing.items():
            if not keys.intersection(running) or address in self._restarting:
                continue
            if nannies.get(address) is None and address in nannies:
                self._held[address] = self._held.get(address, 0) + 1  # lost for this call
                self._output(
                    f"multitrack: the dask worker {address} has no nanny, so its timed-out "
                    "task cannot be stopped; it runs on and its slot is not reused\n",
                    "stderr",
                )
                continue
            # In the background: the scheduler asks the nanny to stop the worker process
            # (politely, then SIGKILL after a few seconds) and the nanny starts a new one,
            # which ``_usable_threads`` counts once it is running.
            self._restarting[address] = asyncio.run_coroutine_threadsafe(
                self._client.scheduler.restart_workers(
                    workers=[address],
                    timeout=RESTART_TIMEOUT,
                    wait_for_workers=False,
                    on_error="return",
                    stimulus_id=f"multitrack-stop-{time.time()}",
                ),
                self._client.loop.asyncio_loop,
            )
            self._threads_checked = -THREADS_MAX_AGE

    # -- waiting --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if self._events:
            timeout = 0.0
        bound = WATCH_INTERVAL if timeout is None else min(timeout, WATCH_INTERVAL)
        if self._dead:
            judge_at = min(at for at, _ in self._dead.values())
            bound = max(0.0, min(bound, judge_at - time.monotonic()))
        futures = [f.future for f in self._flights.values()]
        if futures:
            try:
                with self._client.as_current():  # wait() asks for "the" client
                    done, _ = distributed.wait(futures, bound, return_when="FIRST_COMPLETED")
            except TimeoutError:
                done = set()
            for future in done:
                self._collect(future)
        elif bound > 0:
            time.sleep(bound)
        self._judge_deaths()
        self._watch()
        if self._held and not self._flights and not self._events and self.capacity() == 0:
            raise WorkerStartError(
                "every dask worker thread is held by a timed-out task that dask cannot stop "
                "(its worker has no nanny to restart it), so nothing can run"
            )
        events, self._events = self._events, []
        return events

    def _collect(self, future: Any) -> None:
        flight = self._flights.pop(future.key, None)
        if flight is None:
            return
        chunk = flight.chunk
        del self._by_chunk[chunk.id]
        status = future.status
        if status == "finished":
            try:
                data = future.result()
            except Exception:  # lost between "finished" and the fetch
                self._events.append(_lost(flight, killed=False))
                return
            finally:
                future.release()
            self._on_result(flight, data)
            return
        error = future.exception() if status == "error" else None
        future.release()
        if isinstance(error, distributed.KilledWorker):
            worker = getattr(error.last_worker, "address", str(error.last_worker))
            _, lost = self._dead.setdefault(worker, (time.monotonic() + GATHER, []))
            lost.append(flight)
            flight.pid = getattr(error.last_worker, "pid", None)
            self._threads_checked = -THREADS_MAX_AGE  # that worker is gone: ask again
        elif error is not None:
            raise WorkerStartError(
                f"multitrack's chunk runner failed on a dask worker: {_wire.describe(error)} "
                "(is multitrack installed where the workers run?)"
            ) from error
        else:  # cancelled, but not by us (the scheduler restarted, the client reconnected)
            self._events.append(_lost(flight, killed=False, known=False))

    def _on_result(self, flight: _Flight, data: bytes) -> None:
        self._events.extend(
            _cluster.on_result("dask", flight.chunk, data, self._output, self._send)
        )

    def _judge_deaths(self) -> None:
        """Report the chunks of dead workers once their ``KilledWorker``s are all in."""
        now = time.monotonic()
        for worker, (judge_at, lost) in list(self._dead.items()):
            if now < judge_at:
                continue
            del self._dead[worker]
            alone = len(lost) == 1
            for flight in lost:
                self._events.append(_lost(flight, killed=False, known=alone))

    def _watch(self) -> None:
        """Fail instead of waiting forever on a cluster with no worker."""
        now = time.monotonic()
        if now < self._next_watch or not self._shipment:  # only while a call runs
            return
        self._next_watch = now + WATCH_INTERVAL
        if self._client.nthreads():
            self._no_worker_since = None
            return
        if self._no_worker_since is None:
            self._no_worker_since = now
        elif now - self._no_worker_since > NO_WORKER_GRACE:
            raise WorkerStartError(
                f"the dask cluster at {self._client.scheduler.address} has had no worker for "
                f"{NO_WORKER_GRACE:g} s, so nothing can run"
            )


def _tracker_running() -> bool:
    """Whether multiprocessing's resource tracker process runs. A LocalCluster starts its
    workers with spawn, which starts the tracker: a process that would outlive the call."""
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    return getattr(tracker, "_pid", None) is not None


def _stop_tracker() -> None:
    """Stop the resource tracker our cluster started (it has nothing left to track)."""
    tracker = getattr(multiprocessing.resource_tracker, "_resource_tracker", None)
    stop = getattr(tracker, "_stop", None)
    if stop is not None:
        try:
            stop()
        except Exception:  # it belongs to the stdlib; never fail a call over it
            pass


def _lost(flight: _Flight, *, killed: bool, known: bool = True) -> Lost:
    """A chunk whose worker is gone. ``known`` and one item: it was that item. Otherwise the
    culprit is not known (``running=None``): the scheduler re-runs each item alone."""
    chunk_id = flight.chunk.id
    exact = known and len(flight.positions) == 1
    running = (chunk_id, flight.positions[0]) if exact else None
    return Lost(chunk_id, [chunk_id], running, None, flight.pid, killed)


def _print_through(text: str, stream: str) -> None:
    import sys

    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(text)
    out.flush()
