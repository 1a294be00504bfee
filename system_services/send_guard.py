"""Keep a streaming daemon's D-Bus connection alive when its socket send buffer fills.

dbus-fast's writer treats EAGAIN from a non-blocking send as a fatal error and drops the connection
(DESIGN §4b: about 280 queued messages are enough). Wrapping the socket so that EAGAIN reads as "nothing
sent yet" makes the writer do what it already does for partial writes: wait until the socket is
writable and continue. Sends that carry file descriptors cannot be retried that way (the writer forgets
the descriptors after the first attempt), so those wait for the socket briefly instead.
"""

from __future__ import annotations

import select
import socket
from typing import Any

FD_SEND_WAIT_S = 5.0


class _GuardedSocket:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any, *args: Any) -> int:
        try:
            return self._sock.send(data, *args)
        except BlockingIOError:
            return 0  # the writer keeps the buffer and waits for the socket to become writable

    def sendmsg(self, buffers: Any, ancdata: Any = (), *args: Any) -> int:
        while True:
            try:
                return self._sock.sendmsg(buffers, ancdata, *args)
            except BlockingIOError:
                _, writable, _ = select.select([], [self._sock], [], FD_SEND_WAIT_S)
                if not writable:
                    raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def guard_send_buffer(bus: Any) -> None:
    """Install the guard on a connected dbus_fast.aio.MessageBus."""
    writer = getattr(bus, "_writer", None)
    if writer is None or not hasattr(writer, "sock"):
        raise RuntimeError("the D-Bus connection is not connected (no writer to guard)")
    if not isinstance(writer.sock, _GuardedSocket):
        writer.sock = _GuardedSocket(writer.sock)
