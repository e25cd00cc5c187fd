"""The server's side of the same-host fast path: the workers' shared segments it mapped, and their areas."""
from __future__ import annotations

from typing import Any

import torch

from zps.protocol.fields import UNBOUNDED, is_int
from zps.protocol.messages import ErrorCode, KeyEntry, ProtocolError
from zps.protocol.shm import Segment, ShmUnavailable

from .store import KeyState


class WorkerSegments:
    """Each worker's segment (one per worker on this host) and, per (worker, key), its (push, pull) areas."""

    def __init__(self) -> None:
        self._segments: dict[int, Segment] = {}
        self._areas: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.pids: dict[int, int] = {}  # worker -> the pid it registered with (the coordinator's notices)

    def attach(self, worker: int, description: Any, entries: list[KeyEntry]) -> tuple[Segment | None, dict[str, Any]]:
        """Map the segment an INIT describes if it is this host's, passes every check of
        :meth:`zps.protocol.shm.Segment.attach` and every key's areas fit in it; the segment (None: frames are used)
        and what the INIT reply says about it. Changes nothing here yet (see :meth:`adopt`)."""
        if description is None:
            return None, {}
        if not isinstance(description, dict):
            raise ProtocolError(ErrorCode.BAD_HEADER, "'shm' must be a map")
        try:
            segment = Segment.attach(description, self.pids.get(worker, description.get("pid")))
        except ShmUnavailable as exc:
            return None, {"shm": False, "why": str(exc)}
        try:
            for entry in entries:
                offsets = entry.get("shm")
                if not (isinstance(offsets, list) and len(offsets) == 2
                        and all(is_int(o, 0, UNBOUNDED) for o in offsets)):
                    raise ValueError(f"key {entry['key']}: 'shm' must be [push offset, pull offset]")
                for offset in offsets:
                    segment.view(offset, entry["numel"])
        except ValueError as exc:
            segment.close()
            raise ProtocolError(ErrorCode.BAD_HEADER, f"shared segment layout: {exc}") from None
        return segment, {"shm": True}

    def adopt(self, worker: int, segment: Segment, entries: list[KeyEntry]) -> None:
        """Use ``segment`` (from :meth:`attach`) for ``worker``'s keys from now on, replacing an older one."""
        self.forget(worker)
        self._segments[worker] = segment
        for entry in entries:
            push, pull = entry["shm"]  # type: ignore[misc]  # checked by attach
            numel = entry["numel"]
            self._areas[(worker, entry["key"])] = (segment.view(push, numel), segment.view(pull, numel))

    def view(self, worker: int, state: KeyState, area: int, what: str) -> torch.Tensor:
        """The worker's shared push or pull area of a key (``area``: :data:`zps.protocol.shm.PUSH` or ``PULL``)."""
        areas = self._areas.get((worker, state.key))
        if areas is None:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what} {state.label()}: worker {worker} has no shared segment "
                                                      "for it")
        return areas[area]

    def forget(self, worker: int) -> None:
        for key in [k for k in self._areas if k[0] == worker]:
            del self._areas[key]
        segment = self._segments.pop(worker, None)
        if segment is not None:
            segment.close()
