"""``ClusterBackend``: the driver side that the dask and ray backends share.

Both engines run one engine task per chunk (``_cluster.run_chunk``) and differ only in how a
task is started, waited for and stopped. This class owns everything else; an engine module
supplies the hooks (the methods at the end of the class, called with a leading underscore in
the sketch)::

    Run ─submit(Chunk)─▶ pack_args ─▶ _launch(payload) ──▶ engine task ──▶ cluster worker
                         _flights: handle ─▶ ClusterFlight(chunk, positions, started, pid)
    Run ◀─poll─ events ◀─ _ready(≤ WATCH_INTERVAL): handles with news ─▶ _read(flight)
                           ├─ _finish(flight, bytes): outcomes, prints relayed; "split": _send
                           └─ _finish(flight, None): its worker is gone ─▶ Lost
    Run ─running()─▶ (chunk, first position, started) of each flight that has started
    Run ─kill(chunk id)─▶ _may_kill? ─▶ _cancel(flight) ─▶ Lost(killed=True)
    _watch (in poll): _starved() for longer than its grace ─▶ WorkerStartError

* **A "worker" is a chunk.** The driver never learns which process runs a chunk before it
  ends, and every chunk runs on its own engine task, so the protocol's worker handle
  (``Running.worker``, ``kill(worker)``, ``Lost.worker``) is the chunk id here.
* **Blame**: a chunk of one item whose worker died is that item's crash; for a larger chunk
  (or a death the engine could not pin on the chunk: ``known=False``) the culprit is unknown
  and the scheduler re-runs each item alone, so a second death is charged exactly.
* **Deadlines** count from ``ClusterFlight.started``: submission on an engine that starts a
  chunk when it is placed (dask, ``starts_on_submit``), or the task's "started" marker (ray).
  The engine only times whole chunks (``times_chunks_only``).
* **Never hangs**: ``poll`` waits at most ``WATCH_INTERVAL``; the watchdog fails the call
  when the engine says (``_starved``) it has had nothing to run on for its grace period.
* **Quiet** (``_quiet``): the engine's own reports of dying workers are off while a
  call runs and while a cluster of ours shuts down; the caller gets ``WorkerCrashed``.
* **Lifetimes**: ``end`` forgets every flight (``_abandon`` stops or releases them);
  ``close`` shuts down only what ``_connect`` started (``_shut_down``).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from multitrack._errors import WorkerStartError
from multitrack.backends import _cluster, _wire
from multitrack.backends._base import (
    Backend,
    Chunk,
    Completed,
    Event,
    Lost,
    Outcome,
    Output,
    Running,
    completed_from_outcomes,
    print_through,
)

# Longest single wait: bounds Ctrl-C latency and the watchdog's period.
WATCH_INTERVAL = 0.5


@dataclass(eq=False)
class ClusterFlight:
    """One chunk out on the cluster as one engine task."""

    chunk: Chunk
    handle: Any  # the engine's: a distributed.Future, a Ray ObjectRefGenerator
    positions: list[int]  # chunk positions the remote task runs (not those failed here)
    started: float | None = None  # when its items began to run, as far as the driver knows
    pid: int | None = None  # of the worker process running it, when the engine says

    def lost(self, *, killed: bool, known: bool = True) -> Lost:
        """Its worker is gone. ``known`` and one item: it was that item. Otherwise the culprit
        is not known (``running=None``): the scheduler re-runs each item alone."""
        chunk_id = self.chunk.id
        exact = known and len(self.positions) == 1
        running = (chunk_id, self.positions[0]) if exact else None
        return Lost(chunk_id, [chunk_id], running, None, self.pid, killed)


class ClusterBackend(Backend):
    """Chunks as engine tasks on a cluster; subclasses supply the engine's hooks."""

    can_kill = True
    times_chunks_only = True
    #: ``backend=`` name, the engine's name in messages, and why it refuses a task limit
    backend_name: str
    engine: str
    no_task_limit: str
    #: a chunk's items start when it is submitted (else at its "started" marker)
    starts_on_submit = False

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
                f"max_tasks_per_worker is not supported with backend='{self.backend_name}' "
                f"({self.no_task_limit}); use backend='process'"
            )
        self.slots = workers
        self._workers = workers
        self._address = address
        self._fit_cluster = fit_cluster
        self._initializer = initializer
        self._initargs = initargs
        self._init_key = _cluster.new_key()
        self._shipment: Any = None  # this call's shipment, as _launch sends it; None: no call
        self._flights: dict[Any, ClusterFlight] = {}  # engine handle -> flight
        self._by_chunk: dict[int, ClusterFlight] = {}  # chunk id -> flight
        self._events: list[Event] = []
        self._output: Output = print_through
        self._starved_since: float | None = None
        self._next_watch = 0.0
        self._closed = False

    # -- call lifecycle -------------------------------------------------------------------

    def begin(self, fn: Callable[[Any], Any], output: Output, *, timed: bool = False) -> None:
        if self._closed:
            raise RuntimeError("this pool is closed")
        shipment = _cluster.ship(
            _cluster.new_key(), self._init_key, fn, self._initializer, self._initargs
        )
        self._output = output
        self._quiet(True)  # before _connect: a cluster starting up logs too
        self._connect()
        self._shipment = self._put(shipment)
        if self._fit_cluster:
            size = self._cluster_size()
            if size is not None:
                self.slots = max(1, size)

    def end(self, *, abort: bool) -> None:
        self._abandon(list(self._flights.values()), abort=abort)
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
        self._quiet(True)  # a cluster shutting down reports the workers it stops
        try:
            self._shut_down()
        finally:
            self._quiet(False)

    # -- scheduling -----------------------------------------------------------------------

    def submit(self, chunk: Chunk) -> None:
        payload, failures = _cluster.pack_args(chunk.args)
        self._send(chunk, payload, failures)

    def _send(self, chunk: Chunk, payload: Any, failures: list[Outcome]) -> None:
        """Launch the items of ``chunk`` whose arguments could be packed; report the others."""
        if failures:
            self._events.extend(completed_from_outcomes(chunk.id, failures, 0.0))
        failed = {position for position, _, _ in failures}
        positions = [p for p in range(len(chunk.indices)) if p not in failed]
        if not positions:
            return
        handle = self._launch(payload)
        flight = ClusterFlight(chunk, handle, positions)
        if self.starts_on_submit:
            flight.started = time.monotonic()
        self._flights[handle] = flight
        self._by_chunk[chunk.id] = flight

    def running(self) -> list[Running]:
        return [
            Running(f.chunk.id, f.chunk.id, f.positions[0], f.started)
            for f in self._flights.values()
            if f.started is not None
        ]

    def kill(self, worker: int) -> None:
        flight = self._by_chunk.get(worker)  # the "worker" is the chunk (module docstring)
        if flight is None or not self._may_kill(flight):
            return
        self._drop(flight)
        self._cancel(flight)
        self._events.append(flight.lost(killed=True))

    # -- waiting --------------------------------------------------------------------------

    def poll(self, timeout: float | None) -> Sequence[Event]:
        if self._events:
            timeout = 0.0
        self._wait(WATCH_INTERVAL if timeout is None else min(timeout, WATCH_INTERVAL))
        self._watch()
        events, self._events = self._events, []
        return events

    def _wait(self, bound: float) -> None:
        """Wait at most ``bound`` seconds for chunks to end, and take what ended."""
        if not self._flights:
            if bound > 0:
                time.sleep(bound)
            return
        for handle in self._ready(bound):
            flight = self._flights.get(handle)
            if flight is not None:
                self._read(flight)

    def _finish(self, flight: ClusterFlight, data: bytes | None, *, known: bool = True) -> None:
        """``flight`` ended: with what ``run_chunk`` returned, or (``None``) with its worker."""
        self._drop(flight)
        if data is None:
            self._events.append(flight.lost(killed=False, known=known))
        else:
            self._events.extend(self._on_result(flight.chunk, data))

    def _drop(self, flight: ClusterFlight) -> None:
        del self._flights[flight.handle], self._by_chunk[flight.chunk.id]

    def _on_result(self, chunk: Chunk, data: bytes) -> list[Completed]:
        """What a chunk's result message means, the same on every engine.

        ``done``: the outcomes (returned as events), its prints relayed; ``split``: the worker
        could not unpickle the chunk's arguments, so they are sent again one blob per item;
        otherwise the function or its initializer could not run there: the call stops."""
        message = _cluster.unpack_result(data)
        kind = message[0]
        if kind == "done":
            _, outcomes, busy, lines = message
            for text, stream in lines:
                if text:  # as whole lines
                    self._output(text if text.endswith("\n") else text + "\n", stream)
            return completed_from_outcomes(chunk.id, outcomes, busy)
        if kind == "split":
            payload, failures = _cluster.split_args(chunk.args)
            self._send(chunk, payload, failures)
            return []
        cause = message[1]
        if kind == "start_error":
            raise WorkerStartError(
                f"the initializer failed on a {self.engine} worker: {_wire.describe(cause)}"
            ) from cause
        raise WorkerStartError(
            f"the function could not be loaded on a {self.engine} worker: "
            f"{_wire.describe(cause)} (is its module importable there?)"
        ) from cause

    def _watch(self) -> None:
        """Fail instead of waiting forever on a cluster that cannot run anything."""
        now = time.monotonic()
        if now < self._next_watch or self._shipment is None:  # only while a call runs
            return
        self._next_watch = now + WATCH_INTERVAL
        starved = self._starved()
        if starved is None:
            self._starved_since = None
            return
        grace, message = starved
        if self._starved_since is None:
            self._starved_since = now
        elif now - self._starved_since > grace:
            raise WorkerStartError(message)

    # -- engine hooks ---------------------------------------------------------------------

    @abstractmethod
    def _connect(self) -> None:
        """Attach to the cluster (or start one), once; raise ``WorkerStartError`` if not."""

    @abstractmethod
    def _quiet(self, on: bool) -> None:
        """Silence the engine's driver-side reports (``on``), or restore them."""

    def _put(self, shipment: bytes) -> Any:
        """This call's shipment as ``_launch`` sends it (once per call)."""
        return shipment

    @abstractmethod
    def _cluster_size(self) -> int | None:
        """How many chunks the cluster we attached to runs at once; ``None`` on a cluster
        of our own (it has ``workers`` slots)."""

    @abstractmethod
    def _launch(self, payload: Any) -> Any:
        """Start ``run_chunk`` on ``self._shipment`` and ``payload``; its handle."""

    @abstractmethod
    def _ready(self, bound: float) -> list[Any]:
        """Wait at most ``bound`` seconds for flights to have news; the handles that have."""

    @abstractmethod
    def _read(self, flight: ClusterFlight) -> None:
        """Take ``flight``'s news: ``_finish`` it when it ended."""

    def _may_kill(self, flight: ClusterFlight) -> bool:
        """Whether ``kill`` should stop ``flight`` now (it may have just ended)."""
        return True

    @abstractmethod
    def _cancel(self, flight: ClusterFlight) -> None:
        """Stop a flight ``kill`` dropped: the engine's hardest stop."""

    @abstractmethod
    def _abandon(self, flights: list[ClusterFlight], *, abort: bool) -> None:
        """The call is over: release these flights, and (``abort``) stop them."""

    @abstractmethod
    def _shut_down(self) -> None:
        """Close what ``_connect`` started (the pool is closing)."""

    @abstractmethod
    def _starved(self) -> tuple[float, str] | None:
        """``None`` while the cluster can run a chunk; else how long (seconds) that may last
        before the call fails, and the failure's message."""
