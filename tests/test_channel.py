"""The framing between the parent and a worker (``_channel``): whole messages, whatever the
kernel does to the bytes on the way."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from multitrack.backends import _channel
from multitrack.backends._channel import Channel


class _CountingSocket:
    """A socket that counts ``recv`` calls (C socket methods cannot be patched)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.recv_calls = 0

    def recv(self, size: int, flags: int = 0) -> bytes:
        self.recv_calls += 1
        return self._sock.recv(size, flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


@pytest.fixture
def pair() -> Iterator[tuple[Channel, Channel, _CountingSocket]]:
    left, right = socket.socketpair()
    sender, receiver = Channel(left), Channel(right)
    counting = _CountingSocket(right)
    receiver._sock = counting  # type: ignore[assignment]
    yield sender, receiver, counting
    left.close()
    right.close()


@pytest.mark.timeout(10)
def test_a_message_larger_than_the_socket_buffer_arrives_whole_in_one_read(
    pair: tuple[Channel, Channel, _CountingSocket],
) -> None:
    sender, receiver, counting = pair
    payload = bytes(range(256)) * 40_000  # 10 MB: many times what the kernel buffers
    thread = threading.Thread(target=sender.send_bytes, args=(payload,))
    thread.start()
    data, buffers = receiver.recv_bytes()
    thread.join()
    assert data == payload and buffers == []
    assert counting.recv_calls == 1  # MSG_WAITALL: the body in one call, no copy after it


@pytest.mark.timeout(10)
def test_a_read_cut_short_by_a_signal_is_completed(
    pair: tuple[Channel, Channel, _CountingSocket],
) -> None:
    sender, receiver, counting = pair
    payload = b"x" * 100_000
    frame = _channel._HEADER.pack(len(payload), 0) + payload  # what send_bytes writes

    main = threading.get_ident()

    def send_in_two_halves() -> None:
        sender._sock.sendall(frame[:50_000])
        time.sleep(0.2)
        signal.pthread_kill(main, signal.SIGUSR1)  # while the receiver waits for the rest
        time.sleep(0.2)
        sender._sock.sendall(frame[50_000:])

    interrupted: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _: interrupted.append(signum))
    thread = threading.Thread(target=send_in_two_halves)
    try:
        thread.start()
        data, _ = receiver.recv_bytes()
    finally:
        thread.join()
        signal.signal(signal.SIGUSR1, previous)
    assert interrupted == [signal.SIGUSR1]
    assert data == payload
    assert counting.recv_calls >= 2  # the first read came back short and was completed
