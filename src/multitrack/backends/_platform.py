"""What the operating system gives the process backend, decided once, in one place.

Linux gives everything the backend is built on; other POSIX systems lack some of it, and the
backend has a fallback for each missing piece::

    feature   Linux                        elsewhere (macOS)              fallback
    pidfd     a worker's death wakes the   none                           socket EOF, and a poll
              parent's wait at once                                       of the workers every 0.5 s
    memfd     large buffers and the slot   none                           buffers in the message;
              in anonymous shared memory                                  the slot in a temp file
    fork      workers forked from the      unsafe (system frameworks)     fresh interpreters (the
              zygote (or the caller)                                      same semantics); no
                                                                          start_method="fork"

``MULTITRACK_WITHOUT=pidfd,memfd,fork`` switches features off on Linux too, so that the
fallbacks run in the test suite (``.ci/matrix.py`` runs the contract and fault tests that way);
it is read by the caller and, through the environment, by its workers.

Windows has neither ``fork`` nor the socket and signal semantics the backend needs
(``killpg``, ``SCM_RIGHTS``, sessions): ``require_posix`` refuses it up front, naming what works
there.
"""

from __future__ import annotations

import os
import socket
import sys

WITHOUT_ENV = "MULTITRACK_WITHOUT"
FEATURES = ("pidfd", "memfd", "fork")


def _switched_off() -> frozenset[str]:
    names = {name.strip() for name in os.environ.get(WITHOUT_ENV, "").split(",") if name.strip()}
    unknown = names - set(FEATURES)
    if unknown:
        raise ValueError(
            f"{WITHOUT_ENV}={os.environ[WITHOUT_ENV]!r}: unknown feature(s) "
            f"{', '.join(sorted(unknown))}; the features are {', '.join(FEATURES)}"
        )
    return frozenset(names)


_OFF = _switched_off()
HAS_PIDFD = hasattr(os, "pidfd_open") and "pidfd" not in _OFF
HAS_MEMFD = hasattr(os, "memfd_create") and "memfd" not in _OFF
SHARED_MEMORY = HAS_MEMFD and hasattr(socket, "send_fds")
CAN_FORK = sys.platform == "linux" and "fork" not in _OFF


def require_posix() -> None:
    """Raise a clear error on a platform the process backend does not support.

    Example:
        >>> require_posix()  # on Linux and macOS: nothing to say
    """
    if os.name != "posix":
        raise RuntimeError(
            f"multitrack's process backend needs a POSIX system (Linux, macOS); this is "
            f"{sys.platform}. Use backend='thread' (I/O-bound work, code that releases the "
            "GIL) or backend='dask' / 'ray', or run under WSL."
        )
