"""The job's workers as one server sees them: who is counted from which step (the consistency mode's live set and
clocks) and what each holds here (shared areas, compressed-pull views).

A worker beyond ``--workers`` joins at a step boundary (JOIN); a worker that finished leaves (LEAVE); the coordinator
says when one failed (``gone``: ``--on-worker-failure shrink`` goes on without it) or was replaced by a new process
(``replaced``: what the old one held here is forgotten). Each change returns the updates it made complete (a BSP step
that waited only for a worker that left), for the shard to apply.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from zps.protocol.bodies import NoticeBody
from zps.protocol.messages import ErrorCode, ProtocolError

from ._shm import WorkerSegments
from ._values import Values
from .consistency import Completed, Consistency
from .store import KeyState

log = logging.getLogger("zps.server")


class Members:
    """The workers of server ``name``'s job (``num_workers``: those of ``--workers``; others join)."""

    def __init__(self, name: str, consistency: Consistency, values: Values, segments: WorkerSegments,
                 num_workers: int) -> None:
        self.name, self.consistency, self.values, self.segments = name, consistency, values, segments
        self.num_workers = num_workers

    def join(self, worker: int, step: int, states: Iterable[KeyState]) -> tuple[int, list[Completed]]:
        """A worker beyond --workers (--max-workers) asks to be counted from ``step``: the step it is counted from,
        and the updates that became complete."""
        if worker < self.num_workers:
            raise ProtocolError(ErrorCode.CONFLICT, f"worker {worker} is a member of the job already: only a worker "
                                                    "beyond --workers joins")
        earlier = self.consistency.since.get(worker)
        if earlier is not None and step < earlier:
            raise ProtocolError(ErrorCode.CONFLICT, f"worker {worker} counts from step {earlier} already: a join "
                                                    f"moves only later, not to {step}")
        start, updates = self.consistency.join(worker, step, states)
        if earlier != start:
            log.warning("%s: worker %d joins the running job; from step %d the updates average workers %s",
                        self.name, worker, start, sorted(self.consistency.live))
        return start, updates

    def leave(self, worker: int, states: Iterable[KeyState]) -> list[Completed]:
        """A worker finished cleanly: stop waiting for it, forget what it held here."""
        updates = self.consistency.leave(worker, states)
        self.forget(worker)
        return updates

    def notice(self, notice: NoticeBody, states: Iterable[KeyState]) -> list[Completed]:
        """The coordinator's news of workers (read by :func:`zps.protocol.bodies.read_notice`)."""
        gone = notice.get("gone")
        for worker in (gone, notice.get("replaced")):
            if worker is not None:
                self.forget(worker)
        self.segments.pids.update({int(w): pid for w, pid in notice.get("workers", {}).items()})
        if gone is None or gone not in self.consistency.live:
            return []
        states = list(states)
        step = min((s.version for s in states), default=0)
        updates = self.consistency.leave(gone, states)
        log.warning("%s: worker %d failed (%s); from step %d the updates average workers %s", self.name, gone,
                    notice.get("why", "no reason given"), step, sorted(self.consistency.live))
        return updates

    def forget(self, worker: int) -> None:
        self.values.forget(worker)
        self.segments.forget(worker)
