"""What runs on a cluster worker for the dask and ray backends: the chunk runner, and both ends
of what crosses to it and back.

Both engines run a *task* per chunk; the task is ``run_chunk``, a module-level function (so it
is pickled by reference: the workers import ``multitrack`` instead of receiving code)::

    driver                                             cluster worker (any process, any host)
    ship(fn, initializer) ──bytes, once per call──┐
    pack_args(chunk)      ──bytes, per chunk──────┼──▶ run_chunk(shipment, args)
                                                  │      load fn once per call (cache), run the
    unpack_result(bytes) ◀──bytes─────────────────┘      initializer once per process, run items,
      -> ("done", outcomes, busy, output)                capture their prints, pickle outcomes

Everything crosses as ``bytes`` that we pickle ourselves (``_wire``), never as objects the
engine pickles: an argument that cannot be unpickled on the worker, or a result that cannot be
pickled there, then fails *that item* with a clear message (as in the process backend) instead
of failing the engine's task, which would lose every other item of the chunk.

Prints of the task are captured per thread (dask workers may run several tasks at once in
threads) and returned with the outcomes, so the driver shows them above the progress bar; the
engines' own forwarding would write them through the bar (ray) or straight to the terminal
(dask).

Imported on the workers: stdlib, ``_wire`` and ``_base`` only, nothing of dask or ray. That is
why the driver around it, ``ClusterBackend`` (flights, waiting, blame, relaying the prints),
lives apart in ``_cluster_backend``.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from multitrack.backends import _wire
from multitrack.backends._base import Outcome

# Worker side: functions of recent calls by call key (a pool reuses workers across calls).
_LOADED: dict[str, Callable[..., Any]] = {}
_LOADED_KEEP = 4
# Worker side: keys of the initializers already run in this process.
_INITIALIZED: set[str] = set()
_LOAD_LOCK = threading.Lock()


# -- driver side ----------------------------------------------------------------------------


def new_key() -> str:
    return uuid.uuid4().hex


def ship(
    call_key: str,
    init_key: str,
    fn: Callable[..., Any],
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
) -> bytes:
    """Everything a worker needs for one call, pickled once. Raises ``TypeError`` (naming the
    argument) when ``fn`` or the initializer cannot be pickled."""
    try:
        call = (initializer, initargs, fn)
        payload = _wire.foreign_by_value(call, _wire.by_value(call))
    except Exception:
        for name, obj in (("fn", fn), ("initializer", initializer), ("initargs", initargs)):
            try:
                _wire.by_value(obj)
            except Exception as exc:
                raise TypeError(
                    f"{name}={obj!r:.100} cannot be sent to the cluster's workers: "
                    f"{_wire.describe(exc)}. Move what it captures into its arguments."
                ) from exc
        raise
    # The driver's sys.path travels too: a worker started on this host (a local cluster) can
    # then import the caller's modules by reference, as the process backend's workers do.
    return _wire.dumps((call_key, init_key, list(sys.path), payload))


def pack_args(chunk_args: Sequence[Any]) -> tuple[Any, list[Outcome]]:
    """The chunk's arguments as bytes, and the failures of items that cannot be pickled. The
    payload is one blob, or (after a failure) a list with one blob per item (``None`` for
    an item that failed here)."""
    try:
        return _wire.dumps(list(chunk_args)), []
    except Exception:
        pass
    return split_args(chunk_args)


def split_args(chunk_args: Sequence[Any]) -> tuple[Any, list[Outcome]]:
    """One blob per item, so that only the item that cannot cross fails. Outcomes carry the
    item's *position* in the chunk; the backend maps positions to task indices."""
    blobs: list[bytes | None] = []
    failures: list[Outcome] = []
    for position, args in enumerate(chunk_args):
        try:
            blobs.append(_wire.dumps(args))
        except Exception as exc:
            blobs.append(None)
            failures.append((position, False, _wire.pickling_failure("an argument", args, exc)))
    return blobs, failures


def unpack_result(data: bytes) -> tuple[Any, ...]:
    """Decode what ``run_chunk`` returned. ``("done", [(position, ok, value | exception)],
    busy_seconds, [(text, stream)])``, ``("split",)``, ``("start_error", exc)`` or
    ``("fn_error", exc)``."""
    message = _wire.loads(data)
    kind = message[0]
    if kind == "done":
        _, first_failures, positions, values, errors, busy, output = message
        outcomes: list[Outcome] = [
            (position, False, _wire.unpack_error(packed)) for position, _, packed in first_failures
        ]
        for offset, (position, value) in enumerate(zip(positions, values, strict=True)):
            if offset in errors:
                outcomes.append((position, False, _wire.unpack_error(errors[offset])))
            else:
                outcomes.append((position, True, value))
        return ("done", outcomes, busy, output)
    if kind in ("start_error", "fn_error"):
        return (kind, _wire.unpack_error(message[1]))
    return message  # type: ignore[no-any-return]


# -- worker side ----------------------------------------------------------------------------


#: what ``run_chunk_stream`` yields first, when the chunk's items start (the pid follows)
STARTED = b"started:"


def run_chunk(shipment: bytes, args: Any) -> bytes:
    """The task each chunk becomes on a cluster worker. Never raises for a task's failure:
    every item yields ``(ok, value | packed exception)``."""
    result = b""
    for message in _run(shipment, args):
        result = message
    return result


def run_chunk_stream(shipment: bytes, args: Any) -> Iterator[bytes]:
    """``run_chunk`` as a generator (a Ray streaming task): it yields ``STARTED`` and the
    worker's pid when the items start to run, so the driver measures deadlines from the real
    start (not from a wait for a CPU, or for a fresh worker process to boot) and can name the
    process if it dies; then the result."""
    yield from _run(shipment, args)


def _run(shipment: bytes, args: Any) -> Iterator[bytes]:
    with _CAPTURE.capturing() as output:
        try:
            fn = _load(shipment)
        except _StartError as exc:
            yield _wire.dumps((exc.kind, exc.packed))
            return
        positions, calls, failures = _unpack_args(args)
        if calls is None:
            yield _wire.dumps(("split",))
            return
        yield STARTED + str(os.getpid()).encode()
        values: list[Any] = []  # values[k]: the result of calls[k], at positions[k]
        errors: dict[int, Any] = {}  # k -> packed exception
        clock = time.monotonic
        begun = clock()
        for offset, call in enumerate(calls):
            try:
                values.append(fn(call))
            except BaseException as exc:  # SystemExit, KeyboardInterrupt too: its failure
                errors[offset] = _wire.pack_error(exc)
                values.append(None)
        busy = clock() - begun
    message = ("done", failures, positions, values, errors, busy, output)
    try:
        data = _wire.dumps(message)
    except BaseException:
        _wire.make_picklable(values, errors)  # in place: ``message`` holds these two
        data = _wire.dumps(message)
    yield data


class _StartError(Exception):
    def __init__(self, kind: str, packed: Any) -> None:
        super().__init__(kind)
        self.kind = kind
        self.packed = packed


def _load(shipment: bytes) -> Callable[..., Any]:
    """The call's function, loaded once per process per call; the initializer, once per
    process per pool."""
    call_key, init_key, paths, payload = _wire.loads(shipment)
    fn = _LOADED.get(call_key)
    if fn is not None and init_key in _INITIALIZED:
        return fn
    with _LOAD_LOCK:
        fn = _LOADED.get(call_key)
        if fn is None:
            for path in paths:  # after the worker's own entries: its packages win
                if path not in sys.path and path and os.path.isdir(path):
                    sys.path.append(path)
            try:
                initializer, initargs, fn = _wire.loads(payload)
            except BaseException as exc:
                raise _StartError("fn_error", _wire.pack_error(exc)) from None
            if init_key not in _INITIALIZED and initializer is not None:
                try:
                    initializer(*initargs)
                except BaseException as exc:
                    raise _StartError("start_error", _wire.pack_error(exc)) from None
            _INITIALIZED.add(init_key)
            while len(_LOADED) >= _LOADED_KEEP:
                del _LOADED[next(iter(_LOADED))]
            _LOADED[call_key] = fn
    return fn


def _unpack_args(
    args: Any,
) -> tuple[list[int], list[Any] | None, list[tuple[int, bool, Any]]]:
    """(positions, task arguments, failures). ``None`` arguments: the whole-chunk blob could
    not be unpickled here; the driver resends it one blob per item."""
    if isinstance(args, bytes):
        try:
            calls = _wire.loads(args)
        except BaseException:
            return [], None, []
        return list(range(len(calls))), calls, []
    positions, calls, failures = [], [], []
    for position, blob in enumerate(args):
        if blob is None:
            continue  # failed on the driver; reported there
        try:
            calls.append(_wire.loads(blob))
            positions.append(position)
        except BaseException as exc:
            failures.append((position, False, _wire.pack_error(exc)))
    return positions, calls, failures


class _Router(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr`` in a worker: text written by a thread that
    is running a chunk goes to that chunk's capture, anything else to the original stream."""

    def __init__(self, original: Any, stream: str, local: threading.local) -> None:
        self.original = original
        self.stream = stream
        self.local = local

    def write(self, text: str) -> int:
        sink = getattr(self.local, "sink", None)
        if sink is None:
            return self.original.write(text)  # type: ignore[no-any-return]
        sink.append((text, self.stream))
        return len(text)

    def flush(self) -> None:
        if getattr(self.local, "sink", None) is None:
            self.original.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


class _Capture:
    def __init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()

    def install(self) -> None:
        with self.lock:
            for name in ("stdout", "stderr"):
                current = getattr(sys, name)
                if not isinstance(current, _Router):
                    setattr(sys, name, _Router(current, name, self.local))

    def capturing(self) -> _Capturing:
        return _Capturing(self)


class _Capturing:
    def __init__(self, capture: _Capture) -> None:
        self.capture = capture
        self.pieces: list[tuple[str, str]] = []

    def __enter__(self) -> list[tuple[str, str]]:
        self.capture.install()
        self.capture.local.sink = self.pieces
        self.output: list[tuple[str, str]] = []
        return self.output

    def __exit__(self, *exc_info: object) -> None:
        self.capture.local.sink = None
        # Join consecutive pieces of one stream; the driver prints them as whole lines.
        for text, stream in self.pieces:
            if self.output and self.output[-1][1] == stream:
                self.output[-1] = (self.output[-1][0] + text, stream)
            else:
                self.output.append((text, stream))


_CAPTURE = _Capture()
