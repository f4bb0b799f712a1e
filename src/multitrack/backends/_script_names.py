"""A worker's ``__main__``: the names of the caller's script that reached this worker.

A worker started as a fresh interpreter, or forked from the zygote, has a ``__main__`` of its
own (the boot line), not the caller's script: the script's functions and classes reach it by
value (``_wire``), rebuilt by cloudpickle, and exist nowhere under their names. Code inside a
task that looks one up by name then fails where a fork of the caller (mmengine's workers on
Linux) would not: ``pickle.dumps`` of an instance of a script's class (a task caching its
result to disk), a ``multiprocessing`` pool inside a task mapping a script's function, a
registry reading ``sys.modules["__main__"]``. All of them ask the ``__main__`` module for an
attribute, which is what this module answers, lazily (PEP 562's module ``__getattr__``: asked
only for a name the module lacks, so it costs nothing until then):

* the task's function itself, or one of its globals that the script defined (the helpers it
  calls by name; the initializer's globals, when ``_worker`` rebound the function to them);
* a class of the script that cloudpickle rebuilt in this process (an argument's, a
  result's), which it tracks so that an instance coming back is the caller's own class.

What it returns is the very object the task holds, as pickle checks (``obj is found``).
In a fork of the caller (``start_method="fork"``) ``__main__`` is the script itself, with its
names: it asks only for a name the script lacks, and finds none.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable
from typing import Any

from multitrack.backends._wire import Spread

SCRIPT = "__main__"


def expose(functions: Callable[[], Iterable[Any]]) -> None:
    """Let this process's ``__main__`` answer for the script's names: ``functions()`` gives
    the functions loaded here now (the task's), whose globals are searched. Does nothing
    when ``__main__`` answers missing names already (a fork of a script that defines its own
    ``__getattr__``)."""
    main = sys.modules.get(SCRIPT)
    if main is None or "__getattr__" in vars(main):
        return

    def __getattr__(name: str) -> Any:
        found = _find(name, functions)
        if found is None:
            raise AttributeError(f"module {SCRIPT!r} has no attribute {name!r}")
        return found

    setattr(main, "__getattr__", __getattr__)  # noqa: B010 - a module's, read by Python


def _find(name: str, functions: Callable[[], Iterable[Any]]) -> Any:
    for fn in functions():
        fn = _unwrap(fn)
        if getattr(fn, "__module__", None) == SCRIPT and getattr(fn, "__qualname__", "") == name:
            return fn
        namespace = getattr(fn, "__globals__", None)
        value = namespace.get(name) if isinstance(namespace, dict) else None
        if value is not None and getattr(value, "__module__", None) == SCRIPT:
            return value
    return _rebuilt_class(name)


def _unwrap(fn: Any) -> Any:
    """The function inside ``starmap``'s ``Spread`` and ``functools.partial``."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, Spread):
            fn = fn.fn
        else:
            return fn


def _rebuilt_class(name: str) -> type | None:
    """A class of the script that cloudpickle rebuilt here, by its qualified name's first part
    (pickle walks the rest of a nested name itself)."""
    module = sys.modules.get("cloudpickle.cloudpickle")
    tracker = getattr(module, "_DYNAMIC_CLASS_TRACKER_BY_CLASS", None)
    if tracker is None:
        return None
    for cls in list(tracker.keys()):
        if getattr(cls, "__module__", None) == SCRIPT and cls.__qualname__ == name:
            return cls  # type: ignore[no-any-return]
    return None
