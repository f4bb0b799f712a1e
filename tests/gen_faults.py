"""One picklable task for the generated-faults test: ``act(plan)`` does what its ``Plan`` says.

Workers import this module by name (the tests directory is on the caller's sys.path, which
workers inherit). A plan carries its own argument payload: a few MB of bytes, or an object
that cannot be pickled in the caller (``faults.FailsToPickle``) or unpickled in the worker
(``faults.FailsToUnpickle``); with the latter two, ``act`` never runs."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import faults

BIG = 4 << 20  # bytes of a large argument or result


@dataclass(frozen=True)
class Plan:
    """What input number ``tag`` does when it runs.

    ``kind`` is one of ``KINDS``; ``arg`` is its parameter (an exit code, seconds to sleep,
    the stream and ending of a print); ``payload`` travels with the plan (None, ``BIG`` bytes,
    or an argument that fails to pickle or to unpickle)."""

    tag: int
    kind: str
    arg: Any = None
    payload: Any = None

    def __repr__(self) -> str:
        payload = self.payload
        if isinstance(payload, bytes):
            shown = f"<{len(payload)} bytes>"
        elif payload is None:
            shown = "None"
        else:
            shown = type(payload).__name__ + "()"
        return f"Plan({self.tag}, {self.kind!r}, {self.arg!r}, {shown})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """Hypothesis prints a failing example with this (a 4 MB payload stays short)."""
        printer.text(repr(self))


def value_of(plan: Plan) -> Any:
    """What ``act(plan)`` returns when it succeeds: the tag, and the payload's size."""
    size = len(plan.payload) if isinstance(plan.payload, bytes) else None
    return ("ok", plan.tag, size)


def act(plan: Plan) -> Any:
    kind, arg = plan.kind, plan.arg
    if kind == "value":
        return value_of(plan)
    if kind == "raise":
        raise ValueError(f"plan {plan.tag} raises")
    if kind == "sys_exit":
        sys.exit(arg)
    if kind == "os_exit":
        os._exit(arg)
    if kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    if kind == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if kind == "sleep":
        time.sleep(arg)
        return value_of(plan)
    if kind == "hang":  # past the timeout
        time.sleep(arg)
        return value_of(plan)
    if kind == "print":
        stream, end = arg
        print(f"plan {plan.tag} says hello", end=end, file=getattr(sys, stream), flush=True)
        return value_of(plan)
    if kind == "lock":
        return threading.Lock()
    if kind == "bad_init":
        raise faults.BadInit(f"plan {plan.tag} unrebuildable", "second")
    if kind == "big_result":
        return ("big", plan.tag, b"x" * BIG)
    # "unpicklable_arg" and "unloadable_arg" never get here: their argument does not arrive.
    raise AssertionError(f"{plan!r} should never have run")
