"""Barriers at the coordinator: named meeting points of the workers still training.

A worker's BARRIER request waits (:meth:`Barriers.arrive`) until every live worker arrived at the same name, then
every arrival is answered OK (:meth:`Barriers.release`). One that waits longer than ``--timeout`` is answered with
a TIMEOUT naming who is missing (:meth:`Barriers.expire`): the workers waiting hear why; the job itself is not a
barrier's to end, since anyone may open one. When the job fails, every waiter hears why (:meth:`Barriers.fail`).
"""
from __future__ import annotations

import logging
import time

from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError, error_reply
from zps.protocol.peers import COORDINATOR

from .membership import Send

log = logging.getLogger("zps.coordinator")
# a name's length, and how many may be open at once (each holds its arrivals until released)
MAX_BARRIER_NAME = 256
MAX_BARRIERS = 64


class Barriers:
    """The open barriers of one job: name -> (when it opened, worker rank -> (identity, request id))."""

    def __init__(self, timeout: float, send: Send) -> None:
        self.timeout, self.send = timeout, send
        self.open: dict[str, tuple[float, dict[int, tuple[bytes, int]]]] = {}

    def arrive(self, name: object, rank: int, identity: bytes, request_id: int) -> None:
        """Worker ``rank`` waits at barrier ``name``; ProtocolError for a bad name or too many open barriers."""
        if not isinstance(name, str) or len(name) > MAX_BARRIER_NAME:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"a barrier's name is a string of at most {MAX_BARRIER_NAME} "
                                                      "characters")
        if name not in self.open and len(self.open) >= MAX_BARRIERS:
            raise ProtocolError(ErrorCode.CONFLICT, f"{MAX_BARRIERS} barriers are open already; a job waits at one "
                                                    "or two at a time")
        _, arrived = self.open.setdefault(name, (time.monotonic(), {}))
        arrived[rank] = (identity, request_id)

    def release(self, live: set[int]) -> None:
        """Answer every barrier every one of the ``live`` workers arrived at."""
        for name, (_, arrived) in list(self.open.items()):
            if live <= set(arrived):
                for identity, request_id in arrived.values():
                    self.send(identity, Message(Kind.OK, id=request_id, src=COORDINATOR))
                del self.open[name]

    def expire(self, now: float, live: set[int]) -> None:
        """Answer every barrier open longer than the timeout with a TIMEOUT naming the ``live`` workers missing."""
        for name, (started, arrived) in list(self.open.items()):
            if now - started > self.timeout:
                missing = sorted(live - set(arrived))
                reason = f"barrier {name[:100]!r} timed out after {self.timeout:.0f}s waiting for workers {missing}"
                log.error("%s", reason)
                for identity, request_id in arrived.values():
                    self.send(identity, error_reply(request_id, COORDINATOR, ErrorCode.TIMEOUT, reason))
                del self.open[name]

    def fail(self, reason: str) -> None:
        """The job failed: every waiter hears ``reason``."""
        for _, arrived in self.open.values():
            for identity, request_id in arrived.values():
                self.send(identity, error_reply(request_id, COORDINATOR, ErrorCode.DEAD, reason))
