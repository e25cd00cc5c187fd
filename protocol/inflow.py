"""What one peer's connection can make a receiving role hold: a bound, and the watch that enforces it.

ZeroMQ delivers a multipart message whole, so everything of a message arrives in memory before the receiver sees any
part of it, and ``ZMQ_MAXMSGSIZE`` bounds each part, not their number (issue 22: 8 parts of 512 MiB held 4.4 GB
against a 1 GiB cap). The real bound of one connection is *parts x part size x queue*, and here each factor is held:

* the queue: the socket's receive high-water mark is :data:`QUEUE` messages (ZeroMQ stops reading the connection
  while that many complete messages wait: TCP's backpressure reaches the sender);
* parts x part size: :class:`Inflow` watches every connection of the socket and cuts (``shutdown``) one whose bytes
  read by ZeroMQ and not yet delivered to the role exceed ``limit`` = (:data:`QUEUE` + 1) x the cap: the messages
  queued and the one arriving, whatever their parts. ZeroMQ then drops what that connection's message had brought.

So a connection holds at most ``(QUEUE + 1) x cap`` (plus its kernel socket buffer and one watch interval of bytes);
a legitimate peer never comes near it (its messages are each at most the cap, the largest real one a 4 MiB chunk).
How many connections there are is another matter: under ``--secure`` only the job's processes complete a handshake;
without it, anyone who reaches the port (docs/security.md).

The watch reads each connection's bytes received from the kernel (``TCP_INFO``) less what still waits in the socket
(``FIONREAD``), and counts what the role delivered from it (ZeroMQ names a message's connection: ``ZMQ_SRCFD``),
with ZMTP's framing: one flags byte and a 1- or 8-byte size per part, and under CURVE a 33-byte MESSAGE box.
"""
from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
import threading
from collections.abc import Iterable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("zps.transport")

# complete messages ZeroMQ keeps for a peer before it stops reading the connection (its receive high-water mark;
# libzmq 4.3 with CURVE takes no message at all with a mark of 1)
QUEUE = 2
SLACK = 1 << 16  # the handshake's bytes and what the watch cannot tell apart from them
_TCP_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux's struct tcp_info
_TCP_INFO_SIZE = 136
_CALM, _ALERT = 0.02, 0.002  # seconds between looks: normally, and once a connection holds half its limit


def limit_for(cap: int) -> int:
    """The bytes one connection may hold unread, for a cap of ``cap`` bytes per message."""
    return (QUEUE + 1) * cap + SLACK


def wire_bytes(sizes: Iterable[int], curve: bool) -> int:
    """The bytes parts of ``sizes`` (one message as the role received it, without a ROUTER's identity) took on the
    wire."""
    total = 0
    for size in sizes:
        body = size + 33 if curve else size
        total += 1 + (1 if body <= 255 else 8) + body
    return total


class _Connection:
    """One accepted connection, seen through a descriptor of our own (``TCP_INFO``, ``FIONREAD``, ``shutdown``)."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=os.dup(fd))
        self.inode = os.fstat(self.sock.fileno()).st_ino
        self.cut = False

    def unread(self) -> int:
        """Bytes ZeroMQ read from this connection (received, less what still waits in the socket)."""
        info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        received = struct.unpack_from("<Q", info, _TCP_BYTES_RECEIVED)[0]
        waiting = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, waiting)
        return int(received - waiting[0])


class Inflow:
    """Watches the connections of ``sock`` (a ROUTER that binds; call before it does) and cuts any that holds more
    than ``limit`` bytes unread (:func:`limit_for`); the receiving loop calls :meth:`delivered` with every message
    it takes off the socket. ``curve``: the socket speaks CURVE (its framing is larger).

    The watch thread alone reads the socket's monitor and owns a descriptor of each connection (the connection's
    socket is known by its inode, which no later connection reuses); the loop only adds what it delivered."""

    def __init__(self, sock: zmq.Socket, limit: int, name: str, curve: bool = False) -> None:
        self.sock, self.limit, self.name, self.curve = sock, limit, name, curve
        sock.setsockopt(zmq.RCVHWM, QUEUE)
        self.cuts = 0
        self._delivered: dict[int, int] = {}  # socket inode -> wire bytes the loop took from it (the loop writes)
        self._connections: dict[int, _Connection] = {}  # fd -> connection (the watch thread's alone)
        self._stop = threading.Event()
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        self._monitor = sock.get_monitor_socket(events)
        self._thread = threading.Thread(target=self._watch, name=f"zps-inflow-{name}", daemon=True)
        self._thread.start()

    def delivered(self, first: Any, sizes: Iterable[int]) -> None:
        """The loop took a message off the socket: ``first``, its first part (a ROUTER's identity: a zmq.Frame,
        which names the connection), and the sizes of its other parts."""
        try:
            inode = os.fstat(first.get(zmq.SRCFD)).st_ino
        except (AttributeError, OSError, zmq.ZMQError):
            return
        self._delivered[inode] = self._delivered.get(inode, 0) + wire_bytes(sizes, self.curve)

    def _events(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            fd = int(event["value"])
            old = self._connections.pop(fd, None)
            if old is not None:
                self._delivered.pop(old.inode, None)
                old.sock.close()
            if event["event"] == zmq.EVENT_ACCEPTED:
                with contextlib.suppress(OSError):  # (gone already: its DISCONNECTED follows)
                    self._connections[fd] = _Connection(fd)

    def _watch(self) -> None:
        interval = _CALM
        while not self._stop.wait(interval):
            try:
                self._events()
            except zmq.ZMQError:
                return
            interval = _CALM
            for conn in list(self._connections.values()):
                try:
                    held = conn.unread() - self._delivered.get(conn.inode, 0)
                except (OSError, struct.error):  # (not TCP, or a kernel whose TCP_INFO is shorter: not watched)
                    continue
                if held > self.limit and not conn.cut:
                    conn.cut = True
                    self.cuts += 1
                    log.warning("%s: a connection holds %d bytes of messages not yet taken, over %d ((%d + 1) x "
                                "--max-message-bytes): cut", self.name, held, self.limit, QUEUE)
                    with contextlib.suppress(OSError):
                        conn.sock.shutdown(socket.SHUT_RDWR)
                elif held > self.limit // 2:
                    interval = _ALERT

    def close(self) -> None:
        """Stop watching (before the socket closes)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self._monitor.close(linger=0)
        for conn in self._connections.values():
            conn.sock.close()
        self._connections.clear()
