"""Length-prefixed messages over a socket: the one pipe between the parent and a worker, with
large buffers passed beside it in shared memory.

``multiprocessing.connection.Connection`` frames messages the same way, but importing it costs
a worker ~17 ms of start-up (it pulls in most of ``multiprocessing``); this is what we need.
Each side uses its end from one thread (the worker's reader thread receives, its main thread
sends).

Large buffers (numpy arrays, bytearrays: pickle protocol 5's out-of-band ``PickleBuffer``) do
not go through the socket. The sender copies them once into an anonymous ``memfd`` and passes
the file descriptor with the message (``SCM_RIGHTS``); the receiver maps it and unpickles the
arrays *in place*, backed by that mapping: one copy instead of four (pickle, socket write,
socket read, unpickle), and no name in ``/dev/shm`` that a crash or Ctrl-C could leak. The
memory goes back to the system when the last array using it is garbage collected. Where
``memfd_create`` does not exist (macOS), everything travels in-band.

Frame::

    header: data length (Q), buffer count (I)   <- the memfd rides on these bytes
    buffer sizes: count x Q
    data: the pickle
"""

from __future__ import annotations

import collections
import mmap
import os
import pickle
import select
import socket
import struct
from collections.abc import Sequence

from multitrack.backends._platform import SHARED_MEMORY

_HEADER = struct.Struct("!QI")
_SIZE = struct.Struct("!Q")
_ALIGN = 64  # numpy likes aligned data
# Smaller buffers are cheaper to copy through the socket than to map.
OUT_OF_BAND_MIN = 256 * 1024


class Channel:
    """One end of a worker's socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._poller = select.poll()  # made once: ``poll`` runs after every message
        self._poller.register(sock, select.POLLIN)
        self._outbox: collections.deque[_Segment] = collections.deque()

    def fileno(self) -> int:
        return self._sock.fileno()

    def send_bytes(self, data: bytes, buffers: Sequence[pickle.PickleBuffer] = ()) -> None:
        """Send one message and its out-of-band buffers (blocks until the kernel took it).
        The worker's side: its threads may wait for a busy parent."""
        header, fd = _frame(data, buffers)
        if fd is not None:
            try:
                socket.send_fds(self._sock, [header], [fd])
            finally:
                os.close(fd)
            header = b""
        if len(data) < 65536:
            self._sock.sendall(header + data)
        else:  # do not copy a large payload just to prepend a header
            self._sock.sendall(header)
            self._sock.sendall(data)

    # -- the parent's side: sends that never wait -------------------------------------------

    def queue(self, data: bytes, buffers: Sequence[pickle.PickleBuffer] = ()) -> bool:
        """Queue one message and send what the kernel takes now, without waiting. Whether
        everything queued is sent; if not, call ``flush`` when the socket is writable.

        The parent must never block on a worker: a worker whose task holds the GIL in C code
        does not drain its socket, and a blocking send would stop the scheduler (and every
        deadline, and every other worker's results) until that task ends."""
        header, fd = _frame(data, buffers)
        if len(data) < 65536:
            self._outbox.append(_Segment(memoryview(header + data), fd))
        else:  # do not copy a large payload just to prepend a header
            self._outbox.append(_Segment(memoryview(header), fd))
            self._outbox.append(_Segment(memoryview(data), None))
        return self.flush()

    def flush(self) -> bool:
        """Send queued bytes until the kernel's buffer is full; whether the queue is empty.
        Raises ``OSError`` when the other end is gone."""
        outbox = self._outbox
        while outbox:
            segment = outbox[0]
            try:
                if segment.fd is not None:
                    sent = socket.send_fds(
                        self._sock, [segment.data], [segment.fd], socket.MSG_DONTWAIT
                    )
                    os.close(segment.fd)  # it rode on the first byte sent; ours is not needed
                    segment.fd = None
                else:
                    sent = self._sock.send(segment.data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            segment.data = segment.data[sent:]
            if not segment.data:
                outbox.popleft()
        return True

    @property
    def pending(self) -> bool:
        """Whether queued bytes wait for the socket to become writable."""
        return bool(self._outbox)

    def recv_bytes(self) -> tuple[bytes, list[memoryview]]:
        """Receive one whole message and its buffers; ``EOFError`` when the other end is
        gone."""
        raw, fds, _, _ = self._sock.recvmsg(_HEADER.size, socket.CMSG_SPACE(4 * 4))
        if not raw:
            raise EOFError("the other end of the channel is closed")
        fd_list = _fds_of(fds)
        try:
            if len(raw) < _HEADER.size:
                raw += self._recv_exactly(_HEADER.size - len(raw))
            size, count = _HEADER.unpack(raw)
            sizes = [_SIZE.unpack(self._recv_exactly(_SIZE.size))[0] for _ in range(count)]
            data = self._recv_exactly(size)
            views = _import(fd_list[0], sizes) if count else []
        finally:
            for fd in fd_list:
                os.close(fd)
        return data, views

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a message (or EOF) is waiting. (``select.poll``: ``select.select`` fails
        on descriptors over 1023, which a busy parent can have.)"""
        return bool(self._poller.poll(max(0, round(timeout * 1000))))

    def close(self) -> None:
        for segment in self._outbox:  # never sent: their shared memory goes with them
            if segment.fd is not None:
                os.close(segment.fd)
        self._outbox.clear()
        self._sock.close()

    def _recv_exactly(self, size: int) -> bytes:
        # MSG_WAITALL: the whole message in one call, into the bytes object we return (no
        # second copy). It returns less only when a signal or the peer's exit cut it short.
        data = self._sock.recv(size, socket.MSG_WAITALL)
        if len(data) == size:
            return data
        parts = [data]
        received = len(data)
        while received < size:
            part = self._sock.recv(size - received, socket.MSG_WAITALL)
            if not part:
                raise EOFError("the other end of the channel is closed")
            parts.append(part)
            received += len(part)
        return b"".join(parts)


class _Segment:
    """Queued bytes of a message, and the descriptor of its shared memory until it is sent
    (it rides on the first byte of its header)."""

    __slots__ = ("data", "fd")

    def __init__(self, data: memoryview, fd: int | None) -> None:
        self.data = data
        self.fd = fd


def _frame(data: bytes, buffers: Sequence[pickle.PickleBuffer]) -> tuple[bytes, int | None]:
    """A message's header, and a memfd holding its out-of-band buffers (``None``: none)."""
    sizes = [buffer.raw().nbytes for buffer in buffers]
    header = _HEADER.pack(len(data), len(sizes)) + b"".join(_SIZE.pack(n) for n in sizes)
    return header, (_export(buffers, sizes) if buffers else None)


def in_band(buffer: pickle.PickleBuffer) -> bool:
    """Whether a buffer is better pickled in line than passed in shared memory."""
    return not SHARED_MEMORY or buffer.raw().nbytes < OUT_OF_BAND_MIN


def _offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += (size + _ALIGN - 1) // _ALIGN * _ALIGN
    return offsets, max(total, 1)


def _export(buffers: Sequence[pickle.PickleBuffer], sizes: Sequence[int]) -> int:
    offsets, total = _offsets(sizes)
    fd = os.memfd_create("multitrack", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, total)
        # pwrite, not a copy through a mapping: the kernel fills the new pages directly, which
        # measured twice as fast (no page fault per 4 KiB page).
        for buffer, offset in zip(buffers, offsets, strict=True):
            data = buffer.raw()
            written = 0
            while written < data.nbytes:
                written += os.pwrite(fd, data[written:], offset + written)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _import(fd: int, sizes: Sequence[int]) -> list[memoryview]:
    offsets, total = _offsets(sizes)
    whole = memoryview(mmap.mmap(fd, total))  # lives as long as an array uses it
    return [whole[offset : offset + size] for offset, size in zip(offsets, sizes, strict=True)]


def _fds_of(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds
