"""Which dask cluster a ``DaskBackend`` runs on, and the lifetime of what it started there.

::

    DaskBackend._connect ─▶ DaskCluster.connect()
        client=  ─▶ that client (never closed by us)
        address= ─▶ Client(address)                    closed at close()
        Client.current() ─▶ the active client of this process (never closed by us)
        DASK_SCHEDULER_ADDRESS ─▶ Client()              closed at close()
        else     ─▶ LocalCluster(workers, 1 thread each) + Client: both closed at close()

Kept apart from the backend because it is about *which* cluster and *whose* it is, not about
running chunks: only what multitrack started is closed, and a ``LocalCluster`` it started also
takes down the multiprocessing resource tracker its spawned workers started (else that process
would outlive the call). ``quiet`` disables this process's ``distributed`` loggers: a local
cluster's scheduler and nannies log here about every worker that dies or restarts, which the
caller sees as ``WorkerCrashed`` instead.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing.resource_tracker
from typing import Any

from multitrack._errors import WorkerStartError
from multitrack.backends import _wire

# Loaded by name and typed Any: mypy checks this module the same with or without the extra.
dask: Any = importlib.import_module("dask")
distributed: Any = importlib.import_module("distributed")

# allowed-failures on a cluster multitrack starts (see ``_dask``'s docstring).
OWN_ALLOWED_FAILURES = 0


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
