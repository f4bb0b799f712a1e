"""Length-prefixed messages over a socket: the one pipe between the parent and a worker.

``multiprocessing.connection.Connection`` does the same, but importing it costs a worker ~17 ms
of start-up (it pulls in most of ``multiprocessing``); this is the 40 lines we need. It is used
from one thread on each side (the worker's reader thread receives, its main thread sends).
"""

from __future__ import annotations

import select
import socket
import struct

_HEADER = struct.Struct("!Q")


class Channel:
    """One end of a worker's socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def send_bytes(self, data: bytes) -> None:
        """Send one message (blocks until the kernel took all of it)."""
        if len(data) < 65536:
            self._sock.sendall(_HEADER.pack(len(data)) + data)
        else:  # do not copy a large payload just to prepend eight bytes
            self._sock.sendall(_HEADER.pack(len(data)))
            self._sock.sendall(data)

    def recv_bytes(self) -> bytes:
        """Receive one whole message; ``EOFError`` when the other end is gone."""
        (size,) = _HEADER.unpack(self._recv_exactly(_HEADER.size))
        return bytes(self._recv_exactly(size))

    def poll(self, timeout: float = 0.0) -> bool:
        """Whether a message (or EOF) is waiting."""
        return bool(select.select([self._sock], [], [], timeout)[0])

    def close(self) -> None:
        self._sock.close()

    def _recv_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        received = 0
        while received < size:
            count = self._sock.recv_into(view[received:], size - received)
            if count == 0:
                raise EOFError("the other end of the channel is closed")
            received += count
        return buffer
