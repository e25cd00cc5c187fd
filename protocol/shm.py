"""Same-host fast path: a shared-memory segment per (worker, server) pair for tensor bytes.

The worker creates the segment as a *sealed* memfd (``memfd_create`` + ``F_SEAL_SHRINK | F_SEAL_GROW |
F_SEAL_SEAL``): anonymous memory that no name in the file system points to and that nobody, its creator included,
can shrink or grow, so no truncation can ever raise SIGBUS in a process that mapped it. Its INIT describes it as
(pid, fd, size, token); a server on the same host opens ``/proc/<pid>/fd/<fd>`` -- which the kernel allows only to
a process with the rights to inspect the worker, in practice the same user -- and maps it only when

* it is a regular file owned by the server's own user,
* it carries both seals (so it is a sealed memfd, not a file someone named: a plain or tmpfs file has no such
  seals), with the size the worker said,
* the worker's random token is in its first bytes (the very same memory), and
* the pid is the one the worker registered with (the server checks this against the coordinator's record).

Anything else is refused with the reason, and both sides keep using ZeroMQ frames. A server on another host
cannot open it, says so, and frames are used too.

Each key has a push area (worker writes, server reads while handling the push) and a pull area (server writes
while answering, worker reads when the reply arrives); ZeroMQ carries only the headers.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import stat

import torch

from .fields import UNBOUNDED, is_int

_TOKEN_BYTES = 16
_ALIGN = 64
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MAX_SEGMENT_BYTES = 1 << 40  # a claimed size beyond this is not a segment any worker made
PUSH, PULL = 0, 1  # a key's two areas, in the order of its INIT entry's ``shm`` offsets: the gradient, the values


class ShmUnavailable(Exception):
    """The segment cannot be created or attached here (another host, no memfd, a description that does not check
    out); the message says why."""


def align(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


class Segment:
    """A mapped shared-memory segment; :meth:`view` gives float32 tensors over parts of it."""

    def __init__(self, size: int, fd: int, token: bytes, owner: bool) -> None:
        self.size, self.token, self.owner = size, token, owner
        self.fd: int | None = fd if owner else None  # the creator keeps it open, for the server to open by /proc
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            if not owner:
                os.close(fd)
        self._storage = torch.frombuffer(self._map, dtype=torch.uint8)

    @classmethod
    def create(cls, data_bytes: int) -> Segment:
        """A new sealed segment with room for ``data_bytes`` after the token header."""
        size = align(_TOKEN_BYTES) + max(data_bytes, _ALIGN)
        try:
            fd = os.memfd_create("zps-segment", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError) as exc:
            raise ShmUnavailable(f"no memfd on this host ({exc})") from None
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS | fcntl.F_SEAL_SEAL)
        except OSError as exc:
            os.close(fd)
            raise ShmUnavailable(f"cannot size and seal a memfd: {exc}") from None
        token = secrets.token_bytes(_TOKEN_BYTES)
        segment = cls(size, fd, token, owner=True)
        segment._map[:_TOKEN_BYTES] = token
        return segment

    def describe(self) -> dict[str, object]:
        return {"pid": os.getpid(), "fd": self.fd, "size": self.size, "token": self.token.hex()}

    @classmethod
    def attach(cls, description: object, pid: int | None) -> Segment:
        """Map the segment a worker described; ``pid``: the worker's pid as the coordinator registered it (None:
        unknown, refused). Raises :class:`ShmUnavailable` unless every check of the module docstring holds."""
        if not isinstance(description, dict):
            raise ShmUnavailable("the description is not a map")
        claimed, fd_number, size = description.get("pid"), description.get("fd"), description.get("size")
        token_hex = description.get("token")
        if not all(is_int(v, 0, UNBOUNDED) for v in (claimed, fd_number, size)) or not isinstance(token_hex, str):
            raise ShmUnavailable("the description needs pid, fd and size (non-negative integers) and a token")
        if pid is None or claimed != pid:
            raise ShmUnavailable(f"pid {claimed} is not the pid the worker registered with ({pid})")
        if not _TOKEN_BYTES < size <= MAX_SEGMENT_BYTES:  # type: ignore[operator]
            raise ShmUnavailable(f"a segment of {size} bytes is not one a worker makes")
        try:
            token = bytes.fromhex(token_hex)
            fd = os.open(f"/proc/{claimed}/fd/{fd_number}", os.O_RDWR | os.O_CLOEXEC)
        except (ValueError, OSError) as exc:
            raise ShmUnavailable(f"cannot open the worker's segment: {exc}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise ShmUnavailable(f"the segment belongs to uid {info.st_uid}, not this server's {os.getuid()}, "
                                     "or is no regular file")
            if info.st_size != size:
                raise ShmUnavailable(f"the segment has {info.st_size} bytes, the worker said {size}")
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            if seals & _SEALS != _SEALS:
                raise ShmUnavailable("the segment is not sealed against shrinking and growing (not a zps memfd)")
        except BaseException:
            os.close(fd)
            raise
        segment = cls(size, fd, token, owner=False)  # (closes fd: the mapping keeps the memory)
        if bytes(segment._map[:_TOKEN_BYTES]) != token:
            segment.close()
            raise ShmUnavailable("the segment does not carry the worker's token: not the same memory")
        return segment

    @staticmethod
    def data_start() -> int:
        return align(_TOKEN_BYTES)

    def view(self, offset: int, numel: int) -> torch.Tensor:
        """A float32 tensor of ``numel`` elements at byte ``offset`` (checked against the segment's size)."""
        end = offset + numel * 4
        if offset < self.data_start() or offset % 4 or end > self.size:
            raise ValueError(f"[{offset}, {end}) is outside the segment's data area (size {self.size})")
        return self._storage[offset:end].view(torch.float32)

    def release(self) -> None:
        """The server mapped it: the creator's descriptor is no longer needed (the mapping keeps the memory)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        self.release()
        self._storage = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:
            pass  # a tensor view is still alive somewhere; the mapping goes when it does


def layout(numels: list[int]) -> tuple[list[tuple[int, int]], int]:
    """(push offset, pull offset) for each key, and the data bytes needed."""
    offsets, pos = [], Segment.data_start()
    for numel in numels:
        push = pos
        pull = align(push + numel * 4)
        pos = align(pull + numel * 4)
        offsets.append((push, pull))
    return offsets, pos
