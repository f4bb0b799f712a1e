"""The options every call takes: one table, checked in one place, before any worker starts.

``OPTIONS`` is the only list of the options. Each entry says how to check a value (messages
name the argument and what was wrong), whether the option shapes the workers (a ``Pool``
takes it once, not per call), and which capability of the backend it needs. ``validate`` is
the only checker, for ``map``, ``imap``, ``starmap`` and ``Pool`` alike, so that an option a
backend cannot honour is refused the same way on every path (never accepted and ignored)::

    map(**given) ──┐
    Pool(**given) ─┼─▶ validate(base, **given) ─▶ names ─▶ values ─▶ backend capabilities
    pool.map(**given)┘                                                 (backends.CAPABILITIES)

``Options`` is the checked record; a test keeps it, the table and the public signatures'
``TypedDict``s in step.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from multitrack.backends import CAPABILITIES
from multitrack.backends import NAMES as BACKENDS
from multitrack.backends._platform import usable_cpus

ERROR_MODES = ("raise", "return")
START_METHODS = ("spawn", "fork")  # as backends._start.START_METHODS (not imported: os, signal)
ON_CHANGE = ("keep", "restart", "refuse")  # as _checkpoint.ON_CHANGE (not imported: sqlite3)


@dataclass(frozen=True)
class Options:
    """Validated options of one call (or the defaults of one ``Pool``)."""

    workers: int
    backend: str = "process"
    ordered: bool = True
    chunksize: int | None = None
    progress: bool | str = True
    desc: str | None = None
    errors: str = "raise"
    timeout: float | None = None
    retries: int = 0
    retry_delay: float = 0.0
    initializer: Callable[..., Any] | None = None
    initargs: tuple[Any, ...] = ()
    max_tasks_per_worker: int | None = None
    start_method: str | None = None  # how workers start: "spawn" or "fork" (None: the default)
    memory_limit: int | str | None = None  # bytes per worker (PSS), or "auto": a run budget
    checkpoint: str | os.PathLike[str] | None = None  # the journal: finished tasks kept there
    key: Callable[[Any], Any] | None = None  # what names a task in the journal
    on_change: str = "keep"  # the function changed since the journal was written
    report: Any = None  # the end-of-run report: when printed, where else it goes
    address: str | None = None  # dask/ray: the cluster to attach to
    client: Any = None  # dask: an existing distributed.Client
    # Not an option: ``workers`` was left to its default, so a backend attaching to an
    # existing cluster may use all of it instead of this machine's CPU count.
    fit_cluster: bool = False


# -- value checks: each takes (name, value) and returns the value to keep ------------------


def integer(name: str, value: Any, *, minimum: int = 1) -> int:
    """An integer as ``operator.index`` accepts it (numpy's integers too, not ``bool`` nor
    ``float``), at least ``minimum``.

    Example:
        >>> integer("workers", 2)
        2
        >>> integer("workers", 2.0)
        Traceback (most recent call last):
        ...
        TypeError: workers must be an int, got float 2.0
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def _optional_positive(name: str, value: Any) -> int | None:
    return None if value is None else integer(name, value)


def _count(name: str, value: Any) -> int:
    return integer(name, value, minimum=0)


def _choice_of(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value

    return check


def _start_method(name: str, value: Any) -> str | None:
    return None if value is None else _choice_of(START_METHODS)(name, value)


def _seconds(name: str, value: Any, *, allow_zero: bool) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool | str | bytes | complex) or not hasattr(type(value), "__float__"):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    seconds = float(value)  # numpy's floats too
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds


def _timeout(name: str, value: Any) -> float | None:
    return _seconds(name, value, allow_zero=False)


def _delay(name: str, value: Any) -> float:
    return _seconds(name, value, allow_zero=True) or 0.0


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _chunksize(name: str, value: Any) -> int | None:
    return None if value == "auto" else _optional_positive(name, value)


def _progress(name: str, value: Any) -> bool | str:
    if not isinstance(value, bool) and value != "log":
        raise ValueError(f"{name} must be True, False or 'log', got {value!r}")
    return value  # type: ignore[no-any-return]


def _text(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _callable(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def _initargs(name: str, value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
        raise TypeError(f"{name} must be a tuple, got {type(value).__name__}")
    return tuple(value)


def _path(name: str, value: Any) -> str | os.PathLike[str] | None:
    if value is not None and not isinstance(value, str | os.PathLike):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{name} must name a file, got {value!r}")
    return value


def _memory_limit(name: str, value: Any) -> int | str | None:
    if value is None or value == "auto":
        return value  # type: ignore[no-any-return]
    from multitrack._memory import parse_size  # on use only

    return parse_size(name, value)


def _report(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | str | os.PathLike) or callable(value):
        return value
    raise TypeError(
        f"{name} must be True, False, a path (for JSON) or a callable, got {type(value).__name__}"
    )


def _address(name: str, value: Any) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise TypeError(f"{name} must be a cluster address string, got {value!r}")
    return value


def _client(name: str, value: Any) -> Any:
    module = type(value).__module__.partition(".")[0]
    if value is not None and (module != "distributed" or not hasattr(value, "submit")):
        raise TypeError(f"{name} must be a distributed.Client, got {type(value).__name__}")
    return value


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option: how its value is checked, whether it belongs to a ``Pool``, and the
    backend capability a value other than its default needs."""

    check: Callable[[str, Any], Any]
    pool: bool = False  # shapes the workers: a Pool takes it once, not per call
    needs: str | None = None


OPTIONS: dict[str, Option] = {
    "workers": Option(_optional_positive, pool=True),
    "backend": Option(_choice_of(BACKENDS), pool=True),
    "ordered": Option(_flag),
    "chunksize": Option(_chunksize),
    "progress": Option(_progress),
    "desc": Option(_text),
    "errors": Option(_choice_of(ERROR_MODES)),
    "timeout": Option(_timeout, needs="timeout"),
    "retries": Option(_count),
    "retry_delay": Option(_delay),
    "checkpoint": Option(_path),
    "key": Option(_callable),
    "on_change": Option(_choice_of(ON_CHANGE)),
    "report": Option(_report),
    "initializer": Option(_callable, pool=True),
    "initargs": Option(_initargs, pool=True),
    "max_tasks_per_worker": Option(_optional_positive, pool=True, needs="max_tasks_per_worker"),
    "start_method": Option(_start_method, pool=True, needs="start_method"),
    "memory_limit": Option(_memory_limit, pool=True, needs="memory_limit"),
    "address": Option(_address, pool=True, needs="address"),
    "client": Option(_client, pool=True, needs="client"),
}

#: options that shape the workers: a Pool takes them once, not per call
POOL_ONLY = tuple(name for name, option in OPTIONS.items() if option.pool)


def validate(base: Options | None = None, **given: Any) -> Options:
    """Check ``given`` options (on top of ``base``, a ``Pool``'s) and return them as
    ``Options``. Raises ``TypeError`` for an unknown name or a value of the wrong type,
    ``ValueError`` for a wrong value or one the backend cannot honour.

    Example:
        >>> validate(workers=2, ordered=False).ordered
        False
        >>> validate(worker=2)
        Traceback (most recent call last):
        ...
        TypeError: unexpected keyword argument 'worker' (did you mean 'workers'?)
    """
    checked: dict[str, Any] = {}
    for name, value in given.items():
        option = OPTIONS.get(name)
        if option is None:
            raise TypeError(f"unexpected keyword argument {name!r}{_did_you_mean(name)}")
        checked[name] = option.check(name, value)
    if base is None:
        if checked.get("workers") is None:
            checked["workers"] = usable_cpus()
            checked["fit_cluster"] = True
        options = Options(**checked)
    else:
        options = replace(base, **checked)
    _check_capabilities(options)
    return options


def _did_you_mean(name: str) -> str:
    import difflib  # on a typo only

    close = difflib.get_close_matches(name, OPTIONS, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_capabilities(options: Options) -> None:
    """Refuse an option the backend cannot honour, saying why and what to use instead."""
    defaults = _DEFAULTS
    have = CAPABILITIES[options.backend]
    for name, option in OPTIONS.items():
        if option.needs is None or option.needs in have:
            continue
        if getattr(options, name) != defaults[name]:
            raise ValueError(f"{name}= {_WHY_NOT[option.needs](options.backend)}")
    if options.client is not None and options.address is not None:
        raise ValueError("give client= or address=, not both (the client has an address)")
    if options.checkpoint is None:
        for name in ("key", "on_change"):
            if getattr(options, name) != _DEFAULTS[name]:
                raise ValueError(f"{name}= names tasks in a checkpoint: give checkpoint= too")


_DEFAULTS = {f.name: f.default for f in fields(Options) if f.name != "workers"}
_WHY_NOT: dict[str, Callable[[str], str]] = {
    "timeout": lambda backend: (
        f"cannot be enforced with backend={backend!r} (nothing can stop a task running in "
        "the caller's thread); use 'process'"
    ),
    "max_tasks_per_worker": lambda backend: (
        f"is not supported with backend={backend!r} "
        + {
            "serial": "(it has no worker to replace)",
            "dask": "(dask workers are long-lived processes it manages)",
            "ray": "(Ray reuses its worker processes as it sees fit)",
        }.get(backend, "")
        + "; use backend='process'"
    ),
    "start_method": lambda backend: (
        f"is how worker processes start: backend='process' only, not backend={backend!r}"
    ),
    "memory_limit": lambda backend: (
        f"is not supported with backend={backend!r} "
        + {
            "thread": "(threads share one process: no worker's memory can be told apart)",
            "serial": "(it has no worker to replace)",
            "dask": "(give the dask workers a memory_limit of their own instead)",
            "ray": "(Ray's memory monitor does this for its workers)",
        }.get(backend, "")
        + "; use backend='process'"
    ),
    "address": lambda backend: f"is for backend='dask' or 'ray', not backend={backend!r}",
    "client": lambda backend: f"is for backend='dask', not backend={backend!r}",
}
