"""ZeroMQ helpers: bind to a free port on a chosen address, send and receive :class:`Message` s.

Large frames are sent with ``copy=False`` (pyzmq keeps a reference to the buffer until it is sent); received
frames above the threshold come back as zero-copy ``zmq.Frame`` objects.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

from .inflow import Inflow
from .messages import Message, parse_frames
from .variables import join_host_port

# Below this size a copy is cheaper than the bookkeeping of a zero-copy frame (pyzmq's own default is 64 KiB).
COPY_THRESHOLD = 64 * 1024
# Large tensors: do not let unsent messages pile up without bound.
SNDHWM = 1000
RCVHWM = 1000


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: pyzmq's flag enums cost microseconds per test


def readable(sock: zmq.Socket) -> bool:
    """Whether ``sock`` has a message waiting."""
    return bool(int(sock.getsockopt(_EVENTS)) & _POLLIN)


def tcp_address(host: str, port: int) -> str:
    """``tcp://host:port`` (an IPv6 literal bracketed)."""
    return f"tcp://{join_host_port(host, port)}"


# the most parts a message may have (a part per key at most, and a header caps the keys long before this)
MAX_FRAMES = 1 << 16


def configure(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.RCVHWM, RCVHWM)
    return sock


def bind_free(sock: zmq.Socket, host: str) -> str:
    """Bind ``sock`` to a free TCP port on ``host`` (never all interfaces unless ``host`` says so)."""
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    base = tcp_address(host, 0).rsplit(":", 1)[0]
    port = sock.bind_to_random_port(base, min_port=20000, max_port=65000, max_tries=200)
    return tcp_address(host, port)


def connect(sock: zmq.Socket, address: str) -> None:
    if address.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(address)


def send(sock: zmq.Socket, msg: Message, identity: bytes | None = None) -> int:
    """Send ``msg`` (prefixed by a ROUTER ``identity`` when given); large frames go zero-copy. Returns the bytes of
    its header and frames (what crossed the socket, less ZeroMQ's framing and the identity)."""
    return send_frames(sock, msg.to_frames(), identity)


def size_of(frames: Sequence[Any]) -> int:
    """The bytes of ``frames`` (bytes, memoryviews, zmq.Frames)."""
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames)


def send_frames(sock: zmq.Socket, frames: list[Any], identity: bytes | None = None) -> int:
    """Send ``frames`` (a message's :meth:`~Message.to_frames`) as one multipart message; returns their bytes."""
    if identity is not None:
        frames = [identity, *frames]
    last = len(frames) - 1
    total = 0
    for i, frame in enumerate(frames):
        flags = zmq.SNDMORE if i < last else 0
        nbytes = frame.nbytes if isinstance(frame, memoryview) else len(frame)
        total += nbytes
        sock.send(frame, flags, copy=nbytes < COPY_THRESHOLD)
    return total - (len(identity) if identity is not None else 0)


def recv_frames(sock: zmq.Socket) -> list[Any]:
    """Receive one multipart message; large parts stay zero-copy ``zmq.Frame`` s."""
    return sock.recv_multipart(copy=False)


class TooLarge(Exception):
    """A message had more parts or bytes than the receiver takes; it was received and dropped (``identity``: its
    first part, a ROUTER's peer, to answer)."""

    def __init__(self, reason: str, identity: bytes) -> None:
        super().__init__(reason)
        self.identity = identity


def recv_bounded(sock: zmq.Socket, max_frames: int, max_bytes: int, inflow: Inflow | None = None) -> list[Any]:
    """Receive one multipart message (without waiting) of at most ``max_frames`` parts and ``max_bytes`` bytes; a
    larger one is drained part by part (nothing of it is kept) and :class:`TooLarge` says how large it was.
    ``inflow``: the watch of the socket's connections (:mod:`.inflow`), told what was taken off the socket."""
    frames: list[Any] = []
    sizes: list[int] = []  # of the parts after the first (a ROUTER's identity, not on the wire)
    total = 0
    while True:
        frame = sock.recv(zmq.NOBLOCK, copy=False)
        total += len(frame)
        if frames:
            sizes.append(len(frame))
        frames.append(frame)
        more = sock.getsockopt(zmq.RCVMORE)
        if len(frames) > max_frames or total > max_bytes:
            count, first, identity = len(frames), frames[0], frame_bytes(frames[0])
            frames.clear()
            while more:
                size = len(sock.recv(zmq.NOBLOCK, copy=False))
                total += size
                sizes.append(size)
                count += 1
                more = sock.getsockopt(zmq.RCVMORE)
            if inflow is not None:
                inflow.delivered(first, sizes)
            raise TooLarge(f"a message of {count} parts and {total} bytes is over the cap of {max_frames} parts "
                           f"or {max_bytes} bytes (--max-message-bytes)", identity)
        if not more:
            if inflow is not None:
                inflow.delivered(frames[0], sizes)
            return frames


def frame_bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def recv(sock: zmq.Socket) -> Message:
    """Receive and parse one message from a DEALER (no identity frame)."""
    return parse_frames(recv_frames(sock))
