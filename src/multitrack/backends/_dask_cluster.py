"""The dask cluster as ``DaskBackend`` sees it: which one, whose it is, and which of its worker
threads may take a chunk now.

::

    DaskBackend._connect ─▶ DaskCluster.connect()
        client=  ─▶ that client (never closed by us)
        address= ─▶ Client(address)                    closed at close()
        Client.current() ─▶ the active client of this process (never closed by us)
        DASK_SCHEDULER_ADDRESS ─▶ Client()              closed at close()
        else     ─▶ LocalCluster(workers, 1 thread each) + Client: both closed at close()

    DaskBackend.capacity ─▶ usable_threads(): live threads - restarting workers - held threads
    DaskBackend._cancel  ─▶ stop(futures): cancel; restart their workers through the nannies
                                           (a worker without one: its thread is held)

* **Only what multitrack started is closed**, and a ``LocalCluster`` it started also takes down
  the multiprocessing resource tracker its spawned workers started (else that process would
  outlive the call).
* **Threads, not workers, are counted**, as last asked of the scheduler (at most
  ``THREADS_MAX_AGE`` old): while a dead or restarting worker is away, fewer chunks go out,
  so two never share a worker and a death is never blamed on a chunk only queued there.
* **Stopping a task** is restarting its worker process: dask has no other way. A worker with
  no nanny cannot be restarted: its thread is *held* (out of use) for the rest of the call.
* **Quiet**: this process's ``distributed`` loggers are disabled on demand; a local cluster's
  scheduler and nannies log here about every worker that dies or restarts, which the caller
  sees as ``WorkerCrashed`` instead.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing.resource_tracker
import time
from collections.abc import Callable
from typing import Any

from multitrack._errors import WorkerStartError
from multitrack.backends import _wire

# Loaded by name and typed Any: mypy checks this module the same with or without the extra.
dask: Any = importlib.import_module("dask")
distributed: Any = importlib.import_module("distributed")

# allowed-failures on a cluster multitrack starts (see ``_dask``'s docstring).
OWN_ALLOWED_FAILURES = 0
RESTART_TIMEOUT = 60.0
# How old the driver's view of the cluster's worker threads may be.
THREADS_MAX_AGE = 0.2


class DaskCluster:
    """The client a backend uses, and what of it the backend must close."""

    def __init__(self, workers: int, address: str | None, given_client: Any) -> None:
        self.workers = workers
        self.address = address
        self.given_client = given_client
        self.client: Any = None
        self.local: Any = None  # a LocalCluster we started
        self.owns_client = False
        self.started_tracker = False  # our LocalCluster started multiprocessing's tracker
        self.muted: list[logging.Logger] = []
        self.restarting: dict[str, Any] = {}  # worker -> concurrent future of its restart
        # worker -> threads held by timed-out tasks we could not stop (no nanny to restart it)
        self.held: dict[str, int] = {}
        self.threads: dict[str, int] = {}  # worker -> threads, as last asked
        self.threads_checked = -THREADS_MAX_AGE

    # -- which cluster, whose -------------------------------------------------------------

    def connect(self) -> None:
        if self.client is not None:
            return
        if self.given_client is not None:
            self.client = self.given_client
            return
        try:
            if self.address is not None:
                self.client = distributed.Client(self.address, set_as_default=False)
                self.owns_client = True
                return
            try:
                self.client = distributed.Client.current()
                return
            except ValueError:
                pass
            if dask.config.get("scheduler-address", None):
                self.client = distributed.Client(set_as_default=False)
                self.owns_client = True
                return
        except OSError as exc:
            where = self.address or dask.config.get("scheduler-address", None)
            raise WorkerStartError(
                f"could not reach the dask scheduler at {where!r}: {_wire.describe(exc)}"
            ) from exc
        self._start_local()

    def _start_local(self) -> None:
        config = {"distributed.scheduler.allowed-failures": OWN_ALLOWED_FAILURES}
        self.started_tracker = not _tracker_running()
        try:
            with dask.config.set(config):
                self.local = distributed.LocalCluster(
                    n_workers=self.workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=":0",  # a free port: 8787 may be taken (and a warning)
                    silence_logs=logging.CRITICAL,
                )
            self.client = distributed.Client(self.local, set_as_default=False)
        except Exception as exc:
            if self.local is not None:
                self.local.close()
                self.local = None
            raise WorkerStartError(
                f"could not start a local dask cluster: {_wire.describe(exc).rstrip('.')}. "
                "dask starts its workers with 'spawn', which re-imports your script: put the "
                'call under `if __name__ == "__main__":`, or pass client= / address= of a cluster'
            ) from exc
        self.owns_client = True

    def close(self) -> None:
        """Close what we started: our client, our local cluster (and its tracker)."""
        for restart in self.restarting.values():
            restart.cancel()
        self.restarting.clear()
        try:
            if self.owns_client and self.client is not None:
                self.client.close()
            if self.local is not None:
                self.local.close()
                if self.started_tracker:
                    _stop_tracker()
        finally:
            self.client = self.local = None

    def quiet(self, on: bool) -> None:
        """Disable this process's ``distributed`` loggers (``on``), or re-enable those we
        disabled."""
        if not on:
            for logger in self.muted:
                logger.disabled = False
            self.muted.clear()
            return
        names = [n for n in logging.root.manager.loggerDict if n.partition(".")[0] == "distributed"]
        for name in ["distributed", *names]:
            logger = logging.getLogger(name)
            if not logger.disabled:
                logger.disabled = True
                self.muted.append(logger)

    # -- its worker threads ---------------------------------------------------------------

    def usable_threads(self) -> int:
        """Worker threads alive, not restarting and not held."""
        now = time.monotonic()
        if now >= self.threads_checked + THREADS_MAX_AGE:
            for address, restart in list(self.restarting.items()):
                if restart.done():
                    del self.restarting[address]
            self.threads = {
                address: info.get("nthreads", 1)
                for address, info in self.client.scheduler_info()["workers"].items()
                if info.get("status", "running") == "running"  # not closing or restarting
            }
            self.threads_checked = now
        return sum(self.free_threads().values())

    def free_threads(self) -> dict[str, int]:
        """Live worker threads not restarting and not held by a task we could not stop."""
        return {
            address: n - self.held.get(address, 0)
            for address, n in self.threads.items()
            if address not in self.restarting and n > self.held.get(address, 0)
        }

    def recount(self) -> None:
        """A worker is gone or restarting: ask for the threads again at the next count."""
        self.threads_checked = -THREADS_MAX_AGE

    def stop(
        self, futures: list[Any], *, restart: bool, output: Callable[[str, str], None]
    ) -> None:
        """Cancel these tasks and (``restart``) restart the workers running them."""
        keys = {future.key for future in futures}
        try:
            processing = self.client.processing() if restart else {}
            nannies = {
                address: info.get("nanny")
                for address, info in self.client.scheduler_info()["workers"].items()
            }
            self.client.cancel(futures, force=True)
        except Exception:  # the scheduler is gone: nothing runs there any more
            return
        for address, running in processing.items():
            if not keys.intersection(running) or address in self.restarting:
                continue
            if nannies.get(address) is None and address in nannies:
                self.held[address] = self.held.get(address, 0) + 1  # lost for this call
                output(
                    f"multitrack: the dask worker {address} has no nanny, so its timed-out "
                    "task cannot be stopped; it runs on and its slot is not reused\n",
                    "stderr",
                )
            else:
                self._restart(address)

    def _restart(self, address: str) -> None:
        """In the background: the scheduler asks the nanny to stop the worker process
        (politely, then SIGKILL after a few seconds) and the nanny starts a new one, which
        ``usable_threads`` counts once it is running."""
        self.restarting[address] = asyncio.run_coroutine_threadsafe(
            self.client.scheduler.restart_workers(
                workers=[address],
                timeout=RESTART_TIMEOUT,
                wait_for_workers=False,
                on_error="return",
                stimulus_id=f"multitrack-stop-{time.time()}",
            ),
            self.client.loop.asyncio_loop,
        )
        self.recount()


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
