"""Where a measurement's stdout and stderr (and so every progress bar) go.

The bars must cost what they cost in real use, without flooding the console, and every
library must see the same kind of stream, so that none is silently switched off while another
draws. Two sinks, chosen with ``--bars``:

* ``log`` (default): a regular file, as under ``nohup``, slurm or CI. Not a terminal: each
  library does what it does in a log (see ``benchmarks.contenders`` for who draws what).
* ``tty``: a pseudo-terminal (80x24) whose output a runner thread reads and throws away, as
  fast as a terminal emulator would. Every library believes it draws on a terminal.

Both count the bytes written (a column of the report: the cost of a bar in a log file is also
its size) and keep the last few KB, which become the message when a child crashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import struct
import tempfile
import termios
import threading

__all__ = ["FileSink", "PtySink", "Sink", "make_sink"]

TAIL_BYTES = 4096


class Sink:
    """The child's stdout and stderr: ``fd`` to hand over, ``finish`` after it exited."""

    fd: int

    def after_spawn(self) -> None:
        """Called once the child holds ``fd``."""

    def finish(self) -> tuple[int, str]:
        """(bytes written, the last lines as text). Releases everything."""
        raise NotImplementedError


class FileSink(Sink):
    """A temporary log file."""

    def __init__(self) -> None:
        self.fd, self._path = tempfile.mkstemp(prefix="bench-log-")

    def finish(self) -> tuple[int, str]:
        size = os.fstat(self.fd).st_size
        os.lseek(self.fd, max(0, size - TAIL_BYTES), os.SEEK_SET)
        tail = os.read(self.fd, TAIL_BYTES)
        os.close(self.fd)
        os.unlink(self._path)
        return size, tail.decode(errors="replace")


class PtySink(Sink):
    """A pseudo-terminal, drained by a thread."""

    def __init__(self, columns: int = 80, rows: int = 24) -> None:
        self._master, self.fd = pty.openpty()
        size = struct.pack("HHHH", rows, columns, 0, 0)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, size)
        self._written = 0
        self._tail = b""
        self._thread = threading.Thread(target=self._drain, name="pty-drain", daemon=True)
        self._thread.start()

    def after_spawn(self) -> None:
        os.close(self.fd)  # the child has its copy; EOF (EIO) comes when the last holder exits

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: every holder of the other end has closed it
                return
            if not data:
                return
            self._written += len(data)
            self._tail = (self._tail + data)[-TAIL_BYTES:]

    def finish(self) -> tuple[int, str]:
        self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):
            os.close(self._master)  # a leaked holder of the pty: stop reading anyway
        self._thread.join(timeout=2.0)
        return self._written, self._tail.decode(errors="replace")


def make_sink(kind: str) -> Sink:
    """``"log"``: a file; ``"tty"``: a pseudo-terminal."""
    if kind == "log":
        return FileSink()
    if kind == "tty":
        return PtySink()
    raise ValueError(f"--bars must be log or tty, not {kind!r}")
