"""Same-host fast path: a shared-memory segment per (worker, server) pair for tensor bytes.

The worker creates the segment (a file in /dev/shm with a random name and a random token in its first bytes)
and names it in its INIT; a server on the same host maps it and checks the token, which proves it sees the very
same file; a server elsewhere cannot, says so, and both sides keep using ZeroMQ frames. Once the server has
mapped it the worker unlinks the name, so a crash leaves nothing behind in /dev/shm.

Each key has a push area (worker writes, server reads while handling the push) and a pull area (server writes
while answering, worker reads when the reply arrives); ZeroMQ carries only the headers.
"""
from __future__ import annotations

import mmap
import os
import re
import secrets

import torch

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^/dev/shm/zps-[0-9a-f]{32}$")
_TOKEN_BYTES = 16
_ALIGN = 64


class ShmUnavailable(Exception):
    """The segment cannot be created or attached here (another host, no /dev/shm, a bad description)."""


def align(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


class Segment:
    """A mapped shared-memory file; :meth:`view` gives float32 tensors over parts of it."""

    def __init__(self, path: str, size: int, fd: int, token: bytes) -> None:
        self.path, self.size, self.token = path, size, token
        try:
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._storage = torch.frombuffer(self._map, dtype=torch.uint8)

    @classmethod
    def create(cls, data_bytes: int) -> Segment:
        """A new segment with room for ``data_bytes`` after the token header."""
        if not os.path.isdir(SHM_DIR):
            raise ShmUnavailable(f"{SHM_DIR} does not exist on this host")
        path = f"{SHM_DIR}/zps-{secrets.token_hex(16)}"
        size = align(_TOKEN_BYTES) + max(data_bytes, _ALIGN)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, size)
        except OSError as exc:
            raise ShmUnavailable(f"cannot create {path}: {exc}") from None
        token = secrets.token_bytes(_TOKEN_BYTES)
        segment = cls(path, size, fd, token)
        segment._map[:_TOKEN_BYTES] = token
        return segment

    @classmethod
    def attach(cls, path: object, size: object, token_hex: object) -> Segment:
        """Map a segment a worker described; raise :class:`ShmUnavailable` unless it is exactly that file."""
        if not isinstance(path, str) or not _NAME.match(path):
            raise ShmUnavailable(f"{path!r} is not a zps shared-memory segment name")
        if not isinstance(size, int) or size <= 0 or not isinstance(token_hex, str):
            raise ShmUnavailable("bad segment size or token")
        try:
            token = bytes.fromhex(token_hex)
            fd = os.open(path, os.O_RDWR)
        except (ValueError, OSError) as exc:
            raise ShmUnavailable(f"cannot open {path}: {exc}") from None
        try:
            actual = os.fstat(fd).st_size
        except OSError as exc:
            os.close(fd)
            raise ShmUnavailable(str(exc)) from None
        if actual != size:
            os.close(fd)
            raise ShmUnavailable(f"{path} has {actual} bytes, the worker said {size}")
        segment = cls(path, size, fd, token)
        if bytes(segment._map[:_TOKEN_BYTES]) != token:
            segment.close()
            raise ShmUnavailable(f"{path} does not carry the worker's token: not the same file")
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

    def describe(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "token": self.token.hex()}

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
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
