"""--replicas at the coordinator: servers that died, where their chunks went, which copies are complete.

A server that fails (its process exits, its heartbeats stop, or a worker lost its connection to it and its own
heartbeats are late too: :meth:`Failover.due_suspects`) is failed over (:meth:`Failover.server_failed`): each home
it served goes to its first live copy (:mod:`zps.protocol.replicas`), the topology version is bumped and every
member hears of it in a NOTICE (:meth:`Failover.tell`). The job fails only when every complete copy of some home
is lost. A server reports when the copies it serves are complete again (:meth:`Failover.replicated`).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from zps.protocol import replicas
from zps.protocol.config import JobConfig
from zps.protocol.messages import Kind, Message
from zps.protocol.peers import COORDINATOR

from .membership import Member, Send

log = logging.getLogger("zps.coordinator")


class Failover:
    """The failover state of one job (``--replicas`` R > 0); NOTICEs go out through ``send``."""

    def __init__(self, job: JobConfig, send: Send) -> None:
        self.job, self.send = job, send
        self.dead: set[int] = set()  # servers that died; their chunks moved to backups
        self.version = 0  # the topology version, bumped by each failover
        # home -> the live servers known to hold a complete copy of its chunks (a copy being seeded counts once its
        # primary reports its seeds acknowledged: HeartbeatBody's ``replicated``)
        self.holders: dict[int, set[int]] = {h: set(replicas.copies(h, job.replicas, job.num_servers))
                                             for h in range(job.num_servers)} if job.replicas else {}
        self._at = 0.0  # when the newest failover was decided
        self._suspects: dict[int, tuple[float, str]] = {}  # server rank -> (when, which worker) lost its connection

    def server_failed(self, member: Member, why: str, members: Iterable[Member]) -> list[int]:
        """Fail ``member`` (a server) over and tell every live one of ``members``; the homes whose every complete copy
        is now lost (then nothing was told: the job fails)."""
        self.dead.add(member.rank)
        self.version += 1
        self._at = time.monotonic()
        routes = replicas.routes(self.job.replicas, self.job.num_servers, self.dead)
        for held in self.holders.values():
            held.discard(member.rank)
        lost = [home for home, held in self.holders.items() if not held]
        if lost:
            return lost
        moved = {home: owner for home, owner in enumerate(routes) if home in self.dead}
        log.warning("FAILOVER: %s failed (%s); topology version %d: %s; the job goes on", member.where(), why[:500],
                    self.version, ", ".join(f"the chunks of server {h} are now served by server {o}"
                                            for h, o in sorted(moved.items())))
        for m in members:  # the failed server too: one that still runs (falsely suspected, paused) stops serving
            if m.hb_identity is not None and (m is member or not m.failed) and not m.done:
                self.tell(m, m.hb_identity)
        return []

    def replicated(self, server: int) -> None:
        """``server`` reports every chunk it serves complete on all its live copies (re-replication after the newest
        failover is done there): those copies now count as holders."""
        routes = replicas.routes(self.job.replicas, self.job.num_servers, self.dead)
        for home, owner in enumerate(routes):
            if owner != server or home not in self.holders:
                continue
            copies = set(replicas.live_copies(home, self.job.replicas, self.job.num_servers, self.dead))
            if self.holders[home] != copies:
                self.holders[home] = copies
                log.warning("RE-REPLICATED: the chunks of server %d have %d complete copies again (servers %s; "
                            "topology version %d), %.2fs after the failover", home, len(copies), sorted(copies),
                            self.version, time.monotonic() - self._at)

    def suspect(self, ranks: list[object], since: float, who: str) -> None:
        """Worker ``who`` lost its connection to the servers ``ranks`` (its heartbeat's ``suspect``)."""
        for rank in ranks[: self.job.num_servers]:
            if type(rank) is int and 0 <= rank < self.job.num_servers:
                self._suspects.setdefault(rank, (since, who))

    def due_suspects(self, now: float, servers: dict[int, Member], running: bool) -> list[tuple[Member, str]]:
        """The suspected servers to fail over now (only while the job is ``running``), with why: those whose own
        heartbeats are late too (three intervals; not the whole --heartbeat-timeout). A suspect that heartbeats
        since, or is gone, is cleared."""
        late = 3 * self.job.heartbeat_interval
        due = []
        for rank, (since, who) in list(self._suspects.items()):
            server = servers.get(rank)
            if server is None or server.failed or server.done or server.last_seen > since:
                del self._suspects[rank]
            elif now - server.last_seen > late and running:
                del self._suspects[rank]
                due.append((server, f"{who} lost its connection to it and it has sent no heartbeat for "
                                    f"{now - server.last_seen:.1f}s"))
        return due

    def tell(self, member: Member, identity: bytes) -> None:
        """Send ``member`` the newest failover NOTICE (on its heartbeat channel; a member without one yet gets it with
        its next heartbeat)."""
        member.topology_version = self.version
        self.send(identity, Message(Kind.NOTICE, src=COORDINATOR, body=replicas.notice_body(self.version, self.dead)))

    def under_replicated(self) -> list[int]:
        """The homes whose chunks have fewer complete copies than the live servers allow (being re-replicated)."""
        return [home for home, held in sorted(self.holders.items())
                if held != set(replicas.live_copies(home, self.job.replicas, self.job.num_servers, self.dead))]
