"""``multitrack run``, the part that travels to the workers: the user's function, how it is
found, how plain-text inputs become its arguments, and the per-task timing.

::

    parent (_cli_run)                                   worker
    load_function("pkg.mod:fn" | "file.py:fn") ─┐
    Task(index, args, kwargs) per input ────────┼─▶ Job(fn, params, kinds)(task)
                                                │      convert str arguments by annotation
                                                │      time fn(*args, **params, **kwargs)
    (index, value, started, seconds) ◀──────────┘      return (index, value, started, seconds)

``Job`` and ``Task`` live in this module so that they pickle by reference (a worker imports
this small module, nothing else of the command line). ``Task`` carries its index, so results
in completion order (``--unordered``) still say which input they belong to.

A function from a ``.py`` file (``ScriptFunction``) is imported under a module name made from
the file's absolute path (``_mt_script_<stem>_<hash>``), registered in ``sys.modules``, the way
``python FILE`` would run it except that ``__name__`` is not ``"__main__"`` (an
``if __name__ == "__main__":`` block does not run). It travels with the file's source text, so
a worker that does not have the module yet (the default start, a fork of the zygote or a
fresh interpreter; a cluster) rebuilds the same module from the same text, whether or not the
file's folder is on its ``sys.path`` and even if the file changed meanwhile; a fork of the
caller (``MULTITRACK_START_METHOD=fork``) finds it already imported. The file's folder goes
to the front of ``sys.path`` first, as with ``python FILE``, so the file can import its
neighbours. An ``--init`` from the same file
runs in the same module, so the globals it sets are the ones the function reads.

Example:
    >>> job = Job(int, {}, {})
    >>> index, value, started, seconds = job(Task(3, ("42",), {}))
    >>> index, value, seconds >= 0
    (3, 42, True)
    >>> call_repr("resize", ("a.png",), {"size": 200})
    "resize('a.png', size=200)"
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import os
import pathlib
import re
import sys
import time
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "TIMING_ATTRIBUTE",
    "FunctionNotFound",
    "InputError",
    "Job",
    "ScriptFunction",
    "Task",
    "call_repr",
    "convertible_parameters",
    "load_function",
]

#: set on a task's exception in the worker: (wall-clock start, seconds), read by the parent
TIMING_ATTRIBUTE = "_multitrack_run_timing"
_KINDS = ("int", "float", "bool", "path")
_TRUE = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE = frozenset({"0", "false", "no", "off", "n", "f", ""})


class FunctionNotFound(Exception):
    """``MODULE:FUNCTION`` could not be imported or is not callable (exit status 3)."""


class InputError(ValueError):
    """An input that could not be read as arguments (a line that is not JSON, a CSV row of
    the wrong width, a string the annotation cannot convert). After the first input, this
    is the failure of that one task, not of the run."""


class Task:
    """One input as the arguments of one call. ``bad`` holds why an input could not be
    read; the worker raises it as that task's ``InputError``."""

    __slots__ = ("args", "bad", "index", "kwargs")

    def __init__(
        self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any], bad: str | None = None
    ) -> None:
        self.index, self.args, self.kwargs, self.bad = index, args, kwargs, bad

    def __reduce__(self) -> tuple[Any, ...]:
        return (Task, (self.index, self.args, self.kwargs, self.bad))

    def __repr__(self) -> str:  # how the library's messages name the task
        return call_repr("", self.args, self.kwargs)[1:-1] if self.bad is None else "<bad input>"


class Job:
    """The user's function as the library calls it: one ``Task`` in, ``(index, value,
    wall-clock start, seconds)`` out, timed in the worker around the call alone. ``params``
    (``-p NAME=VALUE``) are bound like ``functools.partial``: an input's own keyword wins.
    ``kinds`` names the parameters whose string arguments are converted (``int``, ``float``,
    ``bool``, ``path``); the signature needed for that is computed once per worker."""

    __slots__ = ("_call", "_signature", "fn", "kinds", "params")

    def __init__(
        self, fn: Callable[..., Any], params: dict[str, Any], kinds: dict[str, str]
    ) -> None:
        self.fn, self.params, self.kinds = fn, params, kinds
        self._signature: inspect.Signature | None = None
        self._call: Callable[..., Any] | None = None  # the function itself, found on first use

    def __reduce__(self) -> tuple[Any, ...]:
        return (Job, (self.fn, self.params, self.kinds))

    def __repr__(self) -> str:
        return repr(self.fn)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        """The user's function with the ``-p`` bindings: what ``--checkpoint`` identifies."""
        fn = self.fn.function() if isinstance(self.fn, ScriptFunction) else self.fn
        return functools.partial(fn, **self.params)

    def arguments(self, task: Task) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The converted arguments of ``task`` (raises ``InputError`` or ``TypeError``)."""
        if task.bad is not None:
            raise InputError(task.bad)
        kwargs = {**self.params, **task.kwargs} if self.params else task.kwargs
        if not self.kinds:
            return task.args, kwargs
        if self._signature is None:
            self._signature = signature_of(self.fn)
        return convert(self._signature, self.kinds, task.args, kwargs)

    def __call__(self, task: Task) -> tuple[int, Any, float, float]:
        args, kwargs = self.arguments(task)
        fn = self._call
        if fn is None:
            fn = self._call = self.fn.function() if isinstance(self.fn, ScriptFunction) else self.fn
        started, clock = time.time(), time.perf_counter()
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:
            try:
                setattr(exc, TIMING_ATTRIBUTE, (started, time.perf_counter() - clock))
            except Exception:  # an exception with __slots__: its timing is unknown
                pass
            raise
        return task.index, value, started, time.perf_counter() - clock


# -- finding the function ------------------------------------------------------------------


def load_function(spec: str, *, option: str = "FUNCTION") -> Callable[..., Any]:
    """``"pkg.mod:fn"``, ``"pkg.mod:Class.method"`` or ``"path/to/file.py:fn"`` as a callable.

    Raises ``ValueError`` for a malformed spec (a usage error) and ``FunctionNotFound`` when
    the module cannot be imported or has no such callable. The current folder is put on
    ``sys.path`` (as ``python -m`` does), so a module next to the user is found.

    Example:
        >>> load_function("os.path:join")("a", "b")
        'a/b'
        >>> load_function("os:nope")
        Traceback (most recent call last):
        ...
        multitrack._cli_calls.FunctionNotFound: module 'os' (from os:nope) has no attribute 'nope'
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name or not all(part.isidentifier() for part in name.split(".")):
        raise ValueError(
            f"{option} must be MODULE:FUNCTION or FILE.py:FUNCTION (like mypkg.images:resize), "
            f"got {spec!r}"
        )
    if where.endswith(".py") or os.sep in where:
        return _from_file(where, name, spec)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(where)
    except Exception as exc:
        raise FunctionNotFound(f"cannot import module {where!r}: {_one_line(exc)}") from exc
    return _attribute(module, name, f"module {where!r} (from {spec})")


def _from_file(path: str, name: str, spec: str) -> Callable[..., Any]:
    try:
        source = pathlib.Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FunctionNotFound(f"cannot read {path!r}: {_one_line(exc)}") from exc
    script = ScriptFunction(os.path.abspath(path), source, name)
    try:
        module = script.module()
    except Exception as exc:
        raise FunctionNotFound(f"cannot import {path!r}: {_one_line(exc)}") from exc
    _attribute(module, name, f"file {path!r} (from {spec})")
    return script


def _attribute(module: types.ModuleType, name: str, what: str) -> Callable[..., Any]:
    found: Any = module
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise FunctionNotFound(f"{what} has no attribute {part!r}") from None
    if not callable(found):
        raise FunctionNotFound(f"{what}: {name} is a {type(found).__name__}, not a function")
    return found  # type: ignore[no-any-return]


class ScriptFunction:
    """A function of a ``.py`` file, found again in any process: see the module docstring.
    Calls go to the real function, so tracebacks show the file's own lines."""

    __slots__ = ("_fn", "name", "path", "source")

    def __init__(self, path: str, source: str, name: str) -> None:
        self.path, self.source, self.name = path, source, name
        self._fn: Callable[..., Any] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (ScriptFunction, (self.path, self.source, self.name))

    def __repr__(self) -> str:
        return f"{os.path.basename(self.path)}:{self.name}"

    @property
    def module_name(self) -> str:
        stem = re.sub(r"\W", "_", pathlib.Path(self.path).stem)
        digest = hashlib.sha1(self.path.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        return f"_mt_script_{stem}_{digest}"

    def module(self) -> types.ModuleType:
        """The file's module in this process, run from ``source`` on first use."""
        name = self.module_name
        module = sys.modules.get(name)
        if module is not None:
            return module
        folder = os.path.dirname(self.path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module = types.ModuleType(name)
        module.__file__ = self.path
        sys.modules[name] = module  # before running it: dataclasses and pickle look it up
        try:
            exec(compile(self.source, self.path, "exec"), module.__dict__)
        except BaseException:
            del sys.modules[name]
            raise
        return module

    def function(self) -> Callable[..., Any]:
        if self._fn is None:
            self._fn = _attribute(self.module(), self.name, repr(self))
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function()(*args, **kwargs)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        return f"SyntaxError: {exc.msg} ({exc.filename}, line {exc.lineno})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- arguments: conversion by annotation ---------------------------------------------------


def signature_of(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature of ``fn`` (the real function behind a ``ScriptFunction``), with string
    annotations evaluated when they can be; raises ``ValueError``/``TypeError`` when Python
    cannot tell (some builtins)."""
    target = fn.function() if isinstance(fn, ScriptFunction) else fn
    try:
        return inspect.signature(target, eval_str=True)
    except (NameError, SyntaxError, TypeError, AttributeError):
        return inspect.signature(target)


def convertible_parameters(sig: inspect.Signature) -> dict[str, str]:
    """The parameters whose string arguments are converted, and to what.

    Example:
        >>> import pathlib
        >>> def f(a: int, b, c: "Path | None" = None, *rest: float) -> None: ...
        >>> convertible_parameters(inspect.signature(f))
        {'a': 'int', 'c': 'path', 'rest': 'float'}
    """
    kinds = {}
    for name, parameter in sig.parameters.items():
        kind = _kind(parameter.annotation)
        if kind is not None:
            kinds[name] = kind
    return kinds


def _kind(annotation: Any) -> str | None:
    if isinstance(annotation, str):  # not evaluable here: read the text
        text = annotation.replace(" ", "").strip("'\"")
        for suffix in ("|None", "None|"):
            text = text.replace(suffix, "")
        text = re.sub(r"^(typing\.)?Optional\[(.*)\]$", r"\2", text)
        return {
            "int": "int",
            "float": "float",
            "bool": "bool",
            "Path": "path",
            "pathlib.Path": "path",
            "PurePath": "path",
        }.get(text)
    args = typing.get_args(annotation)
    if args and (typing.get_origin(annotation) is typing.Union or _is_union_type(annotation)):
        rest = [arg for arg in args if arg is not type(None)]
        return _kind(rest[0]) if len(rest) == 1 else None
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if isinstance(annotation, type) and issubclass(annotation, pathlib.PurePath):
        return "path"
    return None


def _is_union_type(annotation: Any) -> bool:
    union_type = getattr(types, "UnionType", None)  # X | Y, Python 3.10+
    return union_type is not None and isinstance(annotation, union_type)


def convert_one(kind: str, value: Any, name: str) -> Any:
    """A string argument as ``kind``; anything else unchanged.

    Example:
        >>> convert_one("bool", "yes", "flag"), convert_one("float", "2.5", "x")
        (True, 2.5)
        >>> convert_one("int", "two", "n")
        Traceback (most recent call last):
        ...
        multitrack._cli_calls.InputError: argument n: cannot convert 'two' to int
    """
    if not isinstance(value, str):
        return value
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "path":
            return pathlib.Path(value)
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    except ValueError:
        pass
    raise InputError(f"argument {name}: cannot convert {value!r} to {kind}")


def convert(
    sig: inspect.Signature, kinds: dict[str, str], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Bind the arguments to ``sig`` (a ``TypeError`` if they do not fit, as the call would
    raise) and convert the string ones by ``kinds``."""
    bound = sig.bind(*args, **kwargs)
    for name, kind in kinds.items():
        if name not in bound.arguments:
            continue
        value = bound.arguments[name]
        parameter = sig.parameters[name]
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            value = tuple(convert_one(kind, item, name) for item in value)
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            value = {key: convert_one(kind, item, key) for key, item in value.items()}
        else:
            value = convert_one(kind, value, name)
        bound.arguments[name] = value
    return bound.args, bound.kwargs


def call_repr(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``name(arg, key=value)``, what ``--dry-run`` prints and the joblog's Command."""
    parts = [repr(arg) for arg in args] + [f"{key}={value!r}" for key, value in kwargs.items()]
    return f"{name}({', '.join(parts)})"
