"""Who is in a job, in which state the job is, and what each member was told: the coordinator's membership.

The states (:class:`State`) and the methods that move between them:

* ``REGISTERING -> RUNNING`` -- every rank the job starts with registered (:meth:`Membership.register`): every
  member gets its topology;
* ``REGISTERING -> RECOVERING`` -- a member of a running job rejoined (:meth:`Membership.rejoin`): this
  coordinator restarted and knows nobody; whoever registered as new is refused, and nothing new may join;
* ``RECOVERING -> RUNNING`` -- every expected member is back (the servers' addresses are those they rejoined with);
* ``RUNNING -> FINISHED`` -- no worker is left training (:meth:`Membership.finish`): the servers are told to shut
  down;
* ``REGISTERING | RECOVERING | RUNNING -> FAILED`` -- :meth:`Membership.fail`, with the reason every member hears.

A registration is one of: a new member (``REGISTERING``: a free rank, or the one asked for); a joiner beyond
``--workers`` (``--max-workers``; answered at once while the job runs, else when it starts); a replacement for a
failed worker (``--on-worker-failure restart``); a rejoin. Refusals raise :class:`ProtocolError` with the reason.
Replies go out through ``send``; nothing here knows the socket.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zps.protocol.bodies import read_register
from zps.protocol.config import JobConfig
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError, error_reply
from zps.protocol.peers import COORDINATOR, parse_peer, peer_name
from zps.protocol.rendezvous import Topology
from zps.telemetry.monitor import Monitor

log = logging.getLogger("zps.coordinator")

Send = Callable[[bytes, Message], None]


class State(enum.Enum):
    REGISTERING = "registering"
    RECOVERING = "recovering"  # restarted: waiting for the members of the running job to rejoin
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass
class Member:
    role: str
    rank: int
    identity: bytes
    request_id: int
    host: str
    pid: int
    address: str | None
    hb_identity: bytes | None = None
    last_seen: float = field(default_factory=time.monotonic)
    done: bool = False
    failed: bool = False
    answered: bool = False  # its registration got its topology
    topology_version: int = 0  # --replicas: the newest failover NOTICE it was sent

    @property
    def name(self) -> str:
        return peer_name(self.role, self.rank)

    def where(self) -> str:
        return f"{self.name} (host {self.host}, pid {self.pid})"


@dataclass(frozen=True)
class Registration:
    """A REGISTER body, checked (:func:`read_registration`)."""

    role: str
    rank: int
    host: str
    pid: int
    address: str | None  # a server's; None for a worker
    rejoin: bool


def read_registration(body: dict[str, Any]) -> Registration:
    """A REGISTER body read by its one reader (:func:`zps.protocol.bodies.read_register`), as a Registration."""
    found = read_register(body)
    return Registration(found["role"], found["rank"], found["host"], found["pid"], found.get("address"),
                        found["rejoin"])


class Membership:
    """The members of one job and its :class:`State`; replies go out through ``send(identity, message)``."""

    def __init__(self, job: JobConfig, send: Send, monitor: Monitor) -> None:
        self.job, self.send, self.monitor = job, send, monitor
        self.expected = {"server": job.num_servers, "worker": job.num_workers}
        self.state = State.REGISTERING
        self.error: str | None = None
        self.members: dict[tuple[str, int], Member] = {}
        self.servers_ready = threading.Event()  # every server registered (and serves): workers may start
        self.on_change: Callable[[], None] | None = None  # called when servers_ready is set
        # the servers' addresses as a member is to see them (--net: a worker's, through its emulated links)
        self.route: Callable[[str, int, tuple[str, ...]], tuple[str, ...]] | None = None
        self.started = time.monotonic()
        self.recovering_since = 0.0  # when the first member rejoined
        self.finished_at: float | None = None

    # -- who is in the job ---------------------------------------------------------------------------------------
    def member(self, src: str) -> Member | None:
        peer = parse_peer(src)
        return self.members.get(peer) if peer is not None else None

    def live_workers(self) -> set[int]:
        """The workers that have not finished (any thread may ask)."""
        return {r for (role, r), m in list(self.members.items()) if role == "worker" and not m.done}

    def complete(self) -> bool:
        """Every rank the job starts with registered (workers that join later are not waited for)."""
        return all((role, r) in self.members for role, count in self.expected.items() for r in range(count))

    def missing(self) -> str:
        """Who has not registered, by role: ``1 of 2 workers (ranks 1)``."""
        parts = []
        for role, count in self.expected.items():
            missing = [r for r in range(count) if (role, r) not in self.members]
            if missing:
                parts.append(f"{len(missing)} of {count} {role}s (ranks {', '.join(map(str, missing))})")
        return "; ".join(parts)

    def server_addresses(self) -> tuple[str, ...]:
        return tuple(str(self.members[("server", r)].address) for r in range(self.expected["server"]))

    def servers_gone(self, grace: float) -> bool:
        """Every server said goodbye or failed, or the job finished ``grace`` seconds ago (those that never answer
        the shutdown are the launcher's to end: no waiting for them forever)."""
        servers = [m for m in self.members.values() if m.role == "server"]
        if all(m.done or m.failed for m in servers):
            return True
        return self.finished_at is not None and time.monotonic() - self.finished_at > grace

    def unknown(self, src: str) -> ProtocolError:
        """A well-formed peer this coordinator does not know: a member of the job it ran before it restarted."""
        return ProtocolError(ErrorCode.UNKNOWN_MEMBER, f"{src[:40]} is not a member known to the coordinator (it "
                                                      "restarted?): register again with 'rejoin'")

    # -- registration --------------------------------------------------------------------------------------------
    def register(self, identity: bytes, request_id: int, request: Registration) -> None:
        """A new member, a joiner or a replacement (not a rejoin), by state and policy."""
        role, rank = request.role, request.rank
        if self.state is State.RECOVERING:
            raise ProtocolError(ErrorCode.RECOVERING, f"{role} cannot join now: the job is running and its coordinator "
                                                      f"restarted; nothing new can join until every member is back "
                                                      f"(waiting for {self.missing()})")
        replaced = self.members.get((role, rank))
        if (self.state is State.RUNNING and role == "worker" and replaced is not None and replaced.failed
                and self.job.on_worker_failure == "restart"):
            self._replace(identity, request_id, request, replaced)
            return
        if role == "worker" and self.job.max_workers and (rank >= self.expected["worker"] or
                                                          (rank < 0 and self.state is State.RUNNING)):
            self._join(identity, request_id, request)
            return
        if self.state is not State.REGISTERING:
            raise ProtocolError(ErrorCode.CONFLICT,
                                f"{role} registered after the cluster was complete ({self.state.value})")
        count = self.expected[role]
        taken = {r for (ro, r) in self.members if ro == role}
        if rank < 0:
            free = [r for r in range(count) if r not in taken]
            if not free:
                raise ProtocolError(ErrorCode.CONFLICT,
                                    f"all {count} {role} ranks are taken; the job expects {count} {role}s")
            rank = free[0]
        elif rank >= count:
            raise ProtocolError(
                ErrorCode.CONFLICT,
                f"{role} rank {rank} is out of range: the job has {count} {role}s (ranks 0-{count - 1})",
            )
        elif rank in taken:  # (who holds it is for the coordinator's log, not for whoever asks)
            log.warning("%s rank %d asked for again (held by %s)", role, rank, self.members[(role, rank)].where())
            raise ProtocolError(ErrorCode.CONFLICT, f"{role} rank {rank} is already registered")
        member = self._add(Member(role, rank, identity, request_id, request.host, request.pid, request.address))
        log.debug("registered %s", member.where())
        if role == "server" and not self.job.replicas:  # a server serves at once: it needs no other's address
            self._answer(member, ())
        if role == "server" and all(("server", r) in self.members for r in range(self.expected["server"])):
            if self.job.replicas:  # a primary forwards its updates to its backups: every server needs the others'
                servers = self.server_addresses()
                for m in self.members.values():
                    if m.role == "server":
                        self._answer(m, servers)
            self.servers_ready.set()
            if self.on_change is not None:
                self.on_change()
        if self.complete():
            self._start()

    def _add(self, member: Member) -> Member:
        self.members[(member.role, member.rank)] = member
        self.monitor.joined(member.role, member.rank, member.host, member.pid)
        return member

    def _start(self) -> None:
        """``REGISTERING -> RUNNING``: every worker gets the servers' addresses."""
        servers = self.server_addresses()
        # the servers learn each worker's pid first: a shared segment is mapped only from the worker that registered
        self.notify_servers({"workers": {str(m.rank): m.pid for (role, _), m in self.members.items()
                                         if role == "worker"}})
        for member in self.members.values():
            if not member.answered:
                self._answer(member, servers)
        self.state = State.RUNNING
        log.info("cluster complete: %d servers, %d workers", self.expected["server"], self.expected["worker"])

    def _join(self, identity: bytes, request_id: int, request: Registration) -> None:
        """--max-workers: a worker beyond --workers joins; once the job runs it gets the servers at once, and each
        server counts it from its next step (it is answered with everyone else when the job starts)."""
        if self.state in (State.FAILED, State.FINISHED):
            raise ProtocolError(ErrorCode.CONFLICT, f"worker cannot join: the job has {self.state.value}")
        limit, first = self.job.worker_ranks, self.expected["worker"]
        taken = {r for (role, r) in self.members if role == "worker"}
        rank = request.rank
        if rank < 0:
            free = [r for r in range(first, limit) if r not in taken]
            if not free:
                raise ProtocolError(ErrorCode.CONFLICT, f"all {limit} worker ranks are taken (--max-workers {limit})")
            rank = free[0]
        elif rank >= limit:
            raise ProtocolError(ErrorCode.CONFLICT, f"worker rank {rank} is out of range: the job takes up to {limit} "
                                                    f"workers (ranks 0-{limit - 1}, --max-workers)")
        elif rank in taken:
            raise ProtocolError(ErrorCode.CONFLICT, f"worker rank {rank} is already registered")
        member = self._add(Member("worker", rank, identity, request_id, request.host, request.pid, None))
        if self.state is not State.RUNNING:
            log.info("%s registered to join; it starts with the job", member.where())
            return
        self.notify_servers({"workers": {str(rank): request.pid}})
        self._answer(member, self.server_addresses())
        live = self.live_workers()
        log.warning("%s joins the running job: %d live workers %s (--max-workers %d)", member.where(), len(live),
                    sorted(live), limit)

    def _replace(self, identity: bytes, request_id: int, request: Registration, old: Member) -> None:
        """--on-worker-failure restart: a replacement takes a failed worker's rank, and the servers hear of it."""
        member = self._add(Member("worker", old.rank, identity, request_id, request.host, request.pid, None))
        servers = self.server_addresses()
        self.notify_servers({"replaced": old.rank, "workers": {str(old.rank): member.pid}})
        self._answer(member, servers)
        log.warning("%s replaces the failed %s", member.where(), old.where())

    def rejoin(self, identity: bytes, request_id: int, request: Registration) -> bool:
        """A member of the running job registers again: this coordinator restarted (and does not know it). True
        when that made the job whole again (``RECOVERING -> RUNNING``)."""
        role, rank, host, pid = request.role, request.rank, request.host, request.pid
        if self.state is State.FAILED:
            raise ProtocolError(ErrorCode.DEAD, self.error or "the job failed")
        ranks = self.job.worker_ranks if role == "worker" else self.expected[role]
        if not 0 <= rank < ranks:
            raise ProtocolError(ErrorCode.CONFLICT, f"{role} rank {rank} cannot rejoin: the job has {ranks} {role}s")
        known = self.members.get((role, rank))
        if known is not None:  # it is back already (a second thread of it asked too)
            if (known.host, known.pid) != (host, pid):
                log.warning("%s rank %d rejoined from host %s, pid %d (held by %s)", role, rank, host, pid,
                            known.where())
                raise ProtocolError(ErrorCode.CONFLICT, f"{role} rank {rank} is held by another process")
            self.send(identity, Message(Kind.OK, id=request_id, src=COORDINATOR))
            return False
        if self.state is State.REGISTERING:
            if any(m.answered for m in self.members.values()):
                raise ProtocolError(ErrorCode.CONFLICT, f"{role} rank {rank} cannot rejoin: this coordinator has "
                                                        "started a new job")
            self._recover()
        elif self.state is not State.RECOVERING and not (self.state is State.RUNNING and rank >= self.expected[role]):
            raise ProtocolError(ErrorCode.CONFLICT, f"{role} rank {rank} is not a member of this job "
                                                    f"({self.state.value})")
        member = self._add(Member(role, rank, identity, request_id, host, pid, request.address, answered=True))
        self.send(identity, Message(Kind.OK, id=request_id, src=COORDINATOR))
        log.info("%s rejoined", member.where())
        if self.state is State.RECOVERING and self.complete():  # (a worker that had joined may come back later)
            self.state = State.RUNNING
            log.warning("every member of the job rejoined after %.1fs: it goes on",
                        time.monotonic() - self.recovering_since)
            self.servers_ready.set()
            return True
        return False

    def _recover(self) -> None:
        """``REGISTERING -> RECOVERING``: the first member of a running job rejoined. Whoever registered as new is
        refused (nothing new joins a running job until its coordinator is back)."""
        reason = ("the job is running and its coordinator restarted; nothing new can join until every member is "
                  "back")
        for m in self.members.values():
            self.send(m.identity, error_reply(m.request_id, COORDINATOR, ErrorCode.RECOVERING, reason))
        self.members.clear()
        self.state = State.RECOVERING
        self.recovering_since = time.monotonic()
        log.warning("a member of a running job rejoined: this coordinator restarted; waiting up to %.0fs "
                    "(--heartbeat-timeout) for the %d servers and %d workers to rejoin", self.job.heartbeat_timeout,
                    self.expected["server"], self.expected["worker"])

    # -- the end -------------------------------------------------------------------------------------------------
    def mark_failed(self, member: Member) -> bool:
        """Note that ``member`` failed; False when that changes nothing (it failed already, or the job is over)."""
        if member.failed or self.state in (State.FAILED, State.FINISHED):
            return False
        member.failed = True
        self.monitor.ended(member.role, member.rank, failed=True)
        return True

    def finish(self) -> None:
        """``RUNNING -> FINISHED``: no worker trains any more; the servers are told to shut down."""
        self.state = State.FINISHED
        self.finished_at = time.monotonic()
        for m in self.members.values():
            if m.role == "server" and m.hb_identity is not None:
                self.send(m.hb_identity, Message(Kind.SHUTDOWN, src=COORDINATOR))

    def fail(self, reason: str) -> None:
        """``-> FAILED``: a registration still waiting is refused with ``reason``, every other member hears it."""
        self.error = reason
        self.state = State.FAILED
        log.error("%s", reason)
        for m in self.members.values():
            if not m.answered:
                self.send(m.identity, error_reply(m.request_id, COORDINATOR, ErrorCode.MISSING, reason))
            elif m.hb_identity is not None:
                self.send(m.hb_identity, error_reply(0, COORDINATOR, ErrorCode.DEAD, reason))

    # -- what members are told -----------------------------------------------------------------------------------
    def notify_servers(self, body: dict[str, Any]) -> None:
        """A NOTICE to every server, on its heartbeat channel."""
        for m in self.members.values():
            if m.role == "server" and m.hb_identity is not None:
                self.send(m.hb_identity, Message(Kind.NOTICE, src=COORDINATOR, body=body))

    def _answer(self, member: Member, servers: tuple[str, ...]) -> None:
        """``member``'s registration answered: its TOPOLOGY."""
        if servers and self.route is not None:
            servers = self.route(member.role, member.rank, servers)
        workers = max([self.job.num_workers] + [r + 1 for (role, r) in self.members if role == "worker"])
        body = Topology(member.role, member.rank, self.job.num_servers, workers, servers,
                        self.job.mode, self.job.staleness).to_body()
        member.last_seen = time.monotonic()
        member.answered = True
        self.send(member.identity, Message(Kind.TOPOLOGY, id=member.request_id, src=COORDINATOR, body=body))
