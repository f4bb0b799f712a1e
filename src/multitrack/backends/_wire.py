"""How things cross the process boundary: pickling with fallbacks, and failures as data.

Imported by the worker, so it stays small and imports nothing heavy.

Two rules:

* Plain ``pickle`` first (it is C and fast); ``cloudpickle`` only when plain pickle refuses
  (lambdas, closures) or when the pickle names ``__main__``: workers are fresh interpreters
  whose ``__main__`` is not the caller's script, so a class or function defined there must
  travel by value. cloudpickle tracks classes it sent by value, so an instance coming back
  from a worker is rebuilt as the caller's own class. What travels by value keeps its file
  name, and its source lines where a worker could not read them (``_source``), so a remote
  traceback shows the caller's file, line and source line.
* A value that cannot be pickled or unpickled becomes a *failure of that one task*, described
  in words (which object, which type, why), never a crash of the worker or the scheduler.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from multitrack.backends._channel import in_band

PROTOCOL = pickle.HIGHEST_PROTOCOL  # 5: out-of-band buffers


def dumps(
    obj: Any, out_of_band: list[pickle.PickleBuffer] | None = None, *, main: bool = False
) -> bytes:
    """Pickle ``obj``; fall back to cloudpickle for what plain pickle cannot carry.

    With ``out_of_band``, large buffers (numpy arrays...) are not copied into the pickle but
    appended to that list, to travel in shared memory (``_channel``). ``main``: the receiver
    is a fork of this process and has its ``__main__``, so a script's function may travel by
    name (with the globals it names left where they are, shared copy-on-write)."""
    keep = _collector(out_of_band)
    try:
        data = pickle.dumps(obj, PROTOCOL, buffer_callback=keep)
    except Exception:
        return by_value(obj, out_of_band)
    if b"__main__" in data and not main:
        # A reference into the caller's script, which a worker cannot import: send by value.
        return by_value(obj, out_of_band)
    return data


def by_value(
    obj: Any,
    out_of_band: list[pickle.PickleBuffer] | None = None,
    *,
    modules: Sequence[str] = (),
) -> bytes:
    """cloudpickle: functions and classes of ``__main__``, lambdas and closures by value, and
    those of the imported ``modules`` too. Imported on first need; a worker that never sees
    such a value never pays for it."""
    import cloudpickle

    from multitrack.backends._source import pickler_class

    if out_of_band is not None:
        out_of_band.clear()  # a failed first attempt may have collected some

    def dump() -> bytes:
        # cloudpickle's Pickler, keeping the code's file name and the source a worker cannot
        # read for itself, for its tracebacks (``_source``)
        file = io.BytesIO()
        pickler_class()(file, PROTOCOL, buffer_callback=_collector(out_of_band)).dump(obj)
        return file.getvalue()

    if not modules:
        return dump()
    # cloudpickle's registry is global: calls in several threads take turns, or one could
    # unregister a module while another pickles a function of it. The user's own
    # registrations stay as they are.
    with _registry_lock:
        ours = [
            sys.modules[name]
            for name in modules
            if name in sys.modules and name not in cloudpickle.list_registry_pickle_by_value()
        ]
        for module in ours:
            cloudpickle.register_pickle_by_value(module)
        try:
            return dump()
        finally:
            for module in ours:
                cloudpickle.unregister_pickle_by_value(module)


_registry_lock = threading.Lock()


def foreign_by_value(obj: Any, data: bytes) -> bytes:
    """``data``, the pickle of what workers call, or ``obj`` pickled again by value when
    ``data`` names a module that a fresh worker cannot import by name (one loaded from a
    file path, or made at run time: ``_importable``). The caller's side only."""
    from multitrack.backends._importable import modules_needed, not_importable

    foreign = not_importable(modules_needed(data))
    return by_value(obj, modules=foreign) if foreign else data


def _collector(
    out_of_band: list[pickle.PickleBuffer] | None,
) -> Callable[[pickle.PickleBuffer], bool] | None:
    if out_of_band is None:
        return None

    def keep(buffer: pickle.PickleBuffer) -> bool:
        if in_band(buffer):
            return True
        out_of_band.append(buffer)
        return False

    return keep


loads = pickle.loads


def track_script_classes() -> None:
    """Before a fork of the caller: give each class of the script its cloudpickle id now.

    Arguments naming the script travel by value (``dumps``), and cloudpickle rebuilds a class
    it has no id for as a copy of it. A fork made before the class was first pickled does
    not know its id, so an argument would arrive as an instance of that copy, not of the
    script's class the fork has: ``pickle.dumps(arg)`` in the task then fails ("not the same
    object as __main__.Job") and a registry of the script's classes misses it. With the id
    given before the fork, the fork finds its own class under it.

    Only once cloudpickle is loaded (12 ms of imports): it is as soon as a function of the
    script is sent (by value, in the payload every call makes), which is the usual case. A
    function of an importable module given an instance of a script's class, in a process
    that had sent nothing by value before, still sees a copy."""
    give_id = getattr(sys.modules.get("cloudpickle.cloudpickle"), "_get_or_create_tracker_id", None)
    main = sys.modules.get("__main__")
    if give_id is None or main is None:
        return
    for value in list(vars(main).values()):
        if isinstance(value, type) and value.__module__ == "__main__":
            give_id(value)


class Spread:
    """``fn(*args)`` as a one-argument function. Workers call every task with exactly one
    argument; tasks with several arguments (``starmap``, ``map`` over several iterables)
    travel as a tuple, and this unpacks it. It pickles by reference (it lives here), with
    ``fn`` inside by the usual rules."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, args: tuple[Any, ...]) -> Any:
        return self.fn(*args)

    def __reduce__(self) -> tuple[type[Spread], tuple[Callable[..., Any]]]:
        return (Spread, (self.fn,))

    def __repr__(self) -> str:
        return repr(self.fn)  # error messages name the user's function


def describe(exc: BaseException) -> str:
    """``"ValueError: bad"``; never raises, even for a broken ``__str__``."""
    try:
        text = str(exc)
    except Exception:
        text = "<str() failed>"
    name = type(exc).__qualname__
    return f"{name}: {text}" if text else name


def qualified_name(tp: type) -> str:
    module = getattr(tp, "__module__", None)
    if module in (None, "builtins", "__main__"):
        return tp.__qualname__
    return f"{module}.{tp.__qualname__}"


def pack_error(exc: BaseException) -> tuple[str, str, str, bytes | None]:
    """A task's exception as data: (type name, message, traceback text, pickled exception).

    The pickled form is ``None`` when the exception cannot be pickled; the parent then builds
    a ``RemoteError`` from the text parts."""
    import traceback  # on the failure path only: 3 ms of every start-up otherwise

    tb_text = "".join(traceback.format_exception(type(exc), exc, _from_the_users_code(exc)))
    try:
        message = str(exc)
    except Exception:
        message = "<str() failed>"
    try:
        blob: bytes | None = dumps(exc)
    except Exception:
        blob = None
    return (qualified_name(type(exc)), message, tb_text, blob)


def _from_the_users_code(exc: BaseException) -> TracebackType | None:
    """``exc``'s traceback without its leading frames in multitrack (the worker's loop, the
    starmap wrapper): it starts where the user's code does, as a loop's would. An error
    raised in multitrack itself keeps its last frame."""
    tb = exc.__traceback__
    while (
        tb is not None
        and tb.tb_next is not None
        and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)
    ):
        tb = tb.tb_next
    return tb


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def unpack_error(packed: tuple[str, str, str, bytes | None]) -> BaseException:
    """Rebuild a task's exception in the parent, with the worker's traceback as its cause."""
    from multitrack._errors import RemoteError, RemoteTraceback

    type_name, message, tb_text, blob = packed
    exc: BaseException | None = None
    if blob is not None:
        try:
            exc = loads(blob)
        except Exception as unpickle_error:
            message = f"{message} (its class could not be rebuilt here: {describe(unpickle_error)})"
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, tb_text)
    exc.__cause__ = RemoteTraceback(tb_text)
    return exc


def make_picklable(values: list[Any], errors: dict[int, Any]) -> None:
    """After a batch of results failed to pickle: replace each result (``values[k]``) or packed
    exception (``errors[k]``) that cannot be pickled by a packed failure that says so, in place.
    The batch then pickles, and only the items at fault fail."""
    for offset, value in enumerate(values):
        failed = offset in errors
        try:
            dumps(errors[offset] if failed else value)
        except BaseException as exc:
            what = "the task's exception" if failed else "the task's result"
            errors[offset] = pack_error(pickling_failure(what, value, exc))
            values[offset] = None


def pickling_failure(what: str, obj: Any, exc: BaseException) -> Exception:
    """The error for a value that could not cross the boundary."""
    from multitrack._errors import RemoteError

    message = f"{what} of type {qualified_name(type(obj))} could not be pickled: {describe(exc)}"
    return RemoteError("PicklingError", message, "")
