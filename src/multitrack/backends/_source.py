"""Real file names and source lines in the tracebacks of functions that travel by value.

A function of the caller's script, a notebook cell or ``python -c`` code crosses to a worker
by value (cloudpickle, ``_wire.by_value``), and cloudpickle renames the file of every code
object it sends to ``"<dynamic-code>"``, so a worker's traceback said::

    File "<dynamic-code>", line 6, in boom

with no source line, where ``concurrent.futures`` shows the script's path and the line. Two
fixes, both inside the pickle, so nothing in the worker protocol changes::

    caller: by_value ── Pickler (cloudpickle's, code objects reduced here) ──┐
              code ──▶ (restore_code, (make, args, co_filename, lines or None))
    worker: unpickling calls restore_code: the code object gets its file name back, and
            the lines, when sent, go into ``linecache`` for ``traceback`` to find

* the **file name** always travels (a string per code object);
* the **lines** travel only when the worker could not read them by path: a notebook cell
  (its ``linecache`` entry in the caller), ``python -c`` code (``sys.orig_argv``), code
  from ``exec``. A script or a module on disk is read by the worker itself, as the caller's
  own tracebacks read it.

The cost is paid where cloudpickle runs anyway: once per function shipment, for by-value
functions only; a function imported by name never comes here.
"""

from __future__ import annotations

import collections
import functools
import linecache
import os
import sys
import types
from collections.abc import Callable
from typing import Any

# One entry of ``linecache.cache``: (size, mtime, lines, full name). mtime None: never checked
# against a file, so ``linecache.checkcache`` keeps it.
_NOT_A_FILE = None


def restore_code(
    make: Callable[..., types.CodeType],
    args: tuple[Any, ...],
    filename: str,
    lines: list[str] | None,
) -> types.CodeType:
    """Worker side (called by unpickling): the code object, with its own file name, and its
    source lines registered where ``traceback`` looks for them when they came along."""
    if lines is not None:
        linecache.cache[filename] = (sum(map(len, lines)), _NOT_A_FILE, lines, filename)
    return make(*args).replace(co_filename=filename)


@functools.lru_cache(maxsize=1)
def pickler_class() -> type[Any]:
    """cloudpickle's ``Pickler``, with code objects reduced by ``_CodeReducer``. Built on
    first use: cloudpickle is imported only when something travels by value."""
    import cloudpickle

    base: type[Any] = cloudpickle.Pickler
    reduce_dynamic = base.dispatch_table.get(types.CodeType)
    if reduce_dynamic is None:  # a cloudpickle that keeps code objects as they are
        return base

    class Pickler(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # before pickle.Pickler.__init__, which reads it once
            reducer = _CodeReducer(reduce_dynamic)
            self.dispatch_table = collections.ChainMap(
                {types.CodeType: reducer}, base.dispatch_table
            )
            super().__init__(*args, **kwargs)

    return Pickler


class _CodeReducer:
    """Reduces the code objects of one pickle; remembers, per file, the lines to send."""

    def __init__(self, reduce_dynamic: Callable[[types.CodeType], Any]) -> None:
        self._reduce_dynamic = reduce_dynamic
        self._lines: dict[str, list[str] | None] = {}

    def __call__(self, code: types.CodeType) -> Any:
        make, args = self._reduce_dynamic(code)
        filename = code.co_filename
        if filename not in self._lines:
            self._lines[filename] = lines_to_send(filename)
        lines = self._lines[filename]
        if lines is not None and filename == "<string>" and not _plausible(code, lines):
            lines = None  # exec'd text, not the ``-c`` program
        return restore_code, (make, args, filename, lines)


def lines_to_send(filename: str) -> list[str] | None:
    """The source lines of ``filename`` when a worker could not read them by path, else
    ``None``: a file on disk is read by the worker itself."""
    if os.path.isfile(filename):
        return None
    lines = linecache.getlines(filename)  # a notebook cell: registered by IPython
    if not lines and filename == "<string>":
        lines = _command_line_source()
    return list(lines) or None


def remember_command_line() -> None:
    """In a fork of the caller, where a function of a ``python -c`` program arrives by name
    (``start_method="fork"``): its lines for tracebacks, which the caller never kept."""
    lines = _command_line_source()
    if lines and "<string>" not in linecache.cache:
        linecache.cache["<string>"] = (sum(map(len, lines)), _NOT_A_FILE, lines, "<string>")


def _command_line_source() -> list[str]:
    """The program of ``python -c PROGRAM``, which Python keeps nowhere but in
    ``sys.orig_argv`` (its code objects are named ``"<string>"``)."""
    orig_argv: list[str] = getattr(sys, "orig_argv", [])
    if not sys.argv or sys.argv[0] != "-c" or len(orig_argv) <= len(sys.argv):
        return []
    # orig_argv: [python, options..., "-c", PROGRAM, *sys.argv[1:]]
    program_at = len(orig_argv) - len(sys.argv)
    option = orig_argv[program_at - 1]
    if not (option.startswith("-") and not option.startswith("--") and option.endswith("c")):
        return []
    lines = orig_argv[program_at].splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return lines


def _plausible(code: types.CodeType, lines: list[str]) -> bool:
    """Whether ``lines`` (the ``-c`` program) are the source of ``code``: ``"<string>"``
    names every ``exec``'d text too, so the line where the code starts, past its decorators,
    must name it (``def name``, ``lambda``)."""
    index = code.co_firstlineno - 1
    while 0 <= index < len(lines) - 1 and lines[index].lstrip().startswith("@"):
        index += 1
    if not 0 <= index < len(lines):
        return False
    name = code.co_name
    if name == "<lambda>":
        return "lambda" in lines[index]
    if name.startswith("<"):  # a comprehension, a module: no name to check
        return True
    return name in lines[index]
