"""The worker's side of the same-host fast path: one shared segment per server, two areas per key.

Each key has a push area (the worker writes its gradient, the server reads it while handling the push) and a pull
area (the server writes the values while answering, the worker reads them when the reply arrives). An area is
reserved from the moment a request uses it until that request's reply for the key arrives; a request that finds
an area reserved sends frames instead (:meth:`SharedAreas.reserve` returns None).
"""
from __future__ import annotations

import logging
import threading

import torch

from zps.protocol.plan import Chunk
from zps.protocol.shm import PULL as PULL
from zps.protocol.shm import PUSH as PUSH
from zps.protocol.shm import Segment, ShmUnavailable
from zps.protocol.shm import layout as shm_layout

log = logging.getLogger("zps.worker")

Mark = tuple[int, int]  # (key, PUSH | PULL): an area reserved by a request in flight


class SharedAreas:
    """The segments this worker shares with servers on its host, and the reservations of their areas."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._segments: dict[int, Segment] = {}  # server -> the segment it mapped
        self._areas: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (push area, pull area)
        self._busy: set[Mark] = set()
        self._lock = threading.Lock()

    def has(self, server: int) -> bool:
        return server in self._segments

    @staticmethod
    def create(chunks: list[Chunk]) -> tuple[Segment, list[tuple[int, int]]] | None:
        """A new segment for ``chunks`` (one server's) and each chunk's (push, pull) offsets; None where this host
        has no shared memory."""
        offsets, data_bytes = shm_layout([c.numel for c in chunks])
        try:
            return Segment.create(data_bytes), offsets
        except ShmUnavailable as exc:
            log.info("no shared memory (%s); using TCP frames", exc)
            return None

    def adopt(self, server: int, segment: Segment, chunks: list[Chunk], offsets: list[tuple[int, int]]) -> None:
        """The server mapped ``segment``: its areas are in use from now on."""
        self._segments[server] = segment
        for chunk, (push, pull) in zip(chunks, offsets, strict=True):
            self._areas[chunk.key] = (segment.view(push, chunk.numel), segment.view(pull, chunk.numel))

    def area(self, key: int, which: int) -> torch.Tensor | None:
        areas = self._areas.get(key)
        return None if areas is None else areas[which]

    def reserve(self, chunk: Chunk, which: int, marks: set[Mark]) -> torch.Tensor | None:
        """The ``which`` area of ``chunk``, reserved into ``marks`` until its reply; None when its server has no
        segment or another request still uses the area (frames are used then)."""
        if chunk.server not in self._segments:
            return None
        mark = (chunk.key, which)
        with self._lock:
            if mark in self._busy:
                return None
            self._busy.add(mark)
        marks.add(mark)
        return self._areas[chunk.key][which]

    def release(self, marks: set[Mark]) -> None:
        if marks:
            with self._lock:
                self._busy -= marks

    def close(self) -> None:
        self._areas.clear()  # the views first, so the mappings can close
        for segment in self._segments.values():
            segment.close()
        self._segments.clear()
