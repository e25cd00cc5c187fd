"""The coordinator (rendezvous) process: registration, rank assignment, topology, barriers, heartbeats.

States: REGISTERING -> RUNNING -> FINISHED, or FAILED from either. Every wait has a deadline and ends with a
message naming who is missing ("waiting for 1 of 2 workers: ranks 1"). When a registered process stops sending
heartbeats, every other process is told (an ERROR notice on its heartbeat channel) and the coordinator fails;
when every worker is done, the servers are told to shut down.

A coordinator restarted on the same address (fresh state) rebuilds the membership of the running job: it answers
a member it does not know with :attr:`ErrorCode.UNKNOWN_MEMBER`; the member registers again with ``rejoin``,
its rank and (a server) its address. The first rejoin moves it REGISTERING -> RECOVERING, where nothing new may
join (:attr:`ErrorCode.RECOVERING`) and barriers wait; once every expected member is back it is RUNNING again
(the servers' addresses are the ones they rejoined with); a member missing after ``--heartbeat-timeout`` fails
the job, naming it.

With ``--replicas`` a server that fails (its process exits, its heartbeats stop, or a worker lost its connection to
it and its heartbeats are late too) is failed over instead: its chunks go to their first live copies
(:mod:`zps.protocol.replicas`), the topology version is bumped and every member hears of it in a NOTICE.
"""
from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from zps.protocol import checkpoint as ckpt
from zps.protocol import metrics as prom
from zps.protocol import replicas, security, transport
from zps.protocol.complaints import Complaints
from zps.protocol.config import ConfigError, JobConfig
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError, error_reply, parse_frames
from zps.protocol.peers import COORDINATOR, parse_peer, peer_name
from zps.protocol.rendezvous import Topology
from zps.protocol.security import Secrets

from .monitor import Monitor, WorkerMetrics

log = logging.getLogger("zps.coordinator")
# checkpoints whose parts are still being reported; an older one that never completed is forgotten
MAX_CHECKPOINTS_IN_FLIGHT = 4
# barriers: a name's length, and how many may be open at once (each holds its arrivals until released)
MAX_BARRIER_NAME = 256
MAX_BARRIERS = 64


class State(enum.Enum):
    REGISTERING = "registering"
    RECOVERING = "recovering"  # restarted: waiting for the members of the running job to rejoin
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


@dataclass
class _Member:
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


class Coordinator:
    """Serves one job. ``serve()`` returns 0 when every worker finished and 1 on failure (see ``error``)."""

    def __init__(self, job: JobConfig, host: str = "127.0.0.1", port: int = 0,
                 context: zmq.Context | None = None, secrets: Secrets | None = None) -> None:
        self.job = job
        if job.secure and secrets is None:
            raise ConfigError("ZPS_SECURE (--secure) is set but the coordinator was given no keys")
        self.secrets = secrets
        self.expected = {"server": job.num_servers, "worker": job.num_workers}
        self.timeout, self.heartbeat_timeout = job.timeout, job.heartbeat_timeout
        self.context = context or zmq.Context.instance()
        self.sock = security.router(self.context, secrets)
        self.sock.setsockopt(zmq.MAXMSGSIZE, job.max_header_bytes)  # its messages are headers only
        if port:
            self.sock.bind(transport.tcp_address(host, port))
            self.address = transport.tcp_address(host, port)
        else:
            self.address = transport.bind_free(self.sock, host)
        self.endpoint = self.address.removeprefix("tcp://")  # host:port, the value of ZPS_COORDINATOR
        self.state = State.REGISTERING
        self.error: str | None = None
        self.failed_by: tuple[str, int] | None = None  # the member whose reported failure failed the job
        self.checkpoints: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}  # parts reported, by checkpoint
        self._lost: collections.deque[tuple[str, int, str]] = collections.deque()  # from the launcher
        self._complaint = Complaints(log, "coordinator")  # refusals, logged once per peer per minute
        self.last_checkpoint = 0
        self.dead_servers: set[int] = set()  # --replicas: servers that died; their chunks moved to backups
        self.topology_version = 0  # bumped by each failover
        # --replicas: home -> the live servers known to hold a complete copy of its chunks (a copy being seeded
        # counts once its primary reports its seeds acknowledged: HeartbeatBody's ``replicated``)
        self.holders: dict[int, set[int]] = {h: set(replicas.copies(h, job.replicas, job.num_servers))
                                             for h in range(job.num_servers)} if job.replicas else {}
        self._failover_at = 0.0  # when the newest failover was decided
        # --replicas: server rank -> (when, which worker) a worker said its connection to that server dropped
        self._suspects: dict[int, tuple[float, str]] = {}
        self.members: dict[tuple[str, int], _Member] = {}
        self.barriers: dict[str, tuple[float, dict[int, tuple[bytes, int]]]] = {}
        self._stop = threading.Event()
        self.servers_ready = threading.Event()  # every server registered (and serves): workers may start
        self.on_change: Callable[[], None] | None = None  # called when servers_ready is set
        # the servers' addresses as a member is to see them (--net: a worker's, through its emulated links)
        self.route: Callable[[str, int, tuple[str, ...]], tuple[str, ...]] | None = None
        self._started = time.monotonic()
        self._recovering_since = 0.0  # when the first member rejoined
        self._finished_at: float | None = None
        self.monitor = Monitor(job.straggler_factor)
        self.registry = CollectorRegistry()
        self.registry.register(WorkerMetrics(self.monitor))
        self._metrics_host = host

    # -- public ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def serve(self) -> int:
        metrics = prom.serve(self.registry, self._metrics_host, prom.metrics_port(self.job.metrics_port,
                                                                                  "coordinator", 0), "coordinator")
        try:
            while not self._stop.is_set():
                if self.sock.poll(100):
                    for _ in range(256):
                        try:
                            frames = transport.recv_bounded(self.sock, 8, self.job.max_header_bytes)
                        except zmq.Again:
                            break
                        except transport.TooLarge as exc:
                            self._complaint(exc.identity, str(exc))
                            continue
                        self._handle(frames)
                self._tick()
                if self.state is State.FAILED:
                    return 1
                if self.state is State.FINISHED and self._servers_gone():
                    return 0
            return 0 if self.state is State.FINISHED else 1
        finally:
            self.sock.close(linger=200)
            if metrics is not None:
                metrics.close()

    # -- handling --------------------------------------------------------------------------------------
    def _reply(self, identity: bytes, msg: Message) -> None:
        transport.send(self.sock, msg, identity=identity)

    def _handle(self, frames: list[Any]) -> None:
        identity = transport.frame_bytes(frames[0])
        request_id = 0
        try:
            msg = parse_frames(frames[1:], header_limit=self.job.max_header_bytes)
            request_id = msg.id
            if self.secrets is not None:  # a key speaks only as its own process (and registers only as it)
                body = msg.body
                claimed = f"{body.get('role')}:{body.get('rank')}" if msg.kind is Kind.REGISTER else msg.src
                security.check_sender(frames[0], claimed)
            if msg.kind is Kind.REGISTER:
                self._register(identity, msg)
            elif msg.kind is Kind.STATUS:
                self._reply(identity, Message(Kind.OK, id=msg.id, src=COORDINATOR, body=self.status()))
            elif msg.kind is Kind.HEARTBEAT:
                self._heartbeat(identity, msg)
            elif msg.kind is Kind.BARRIER:
                self._barrier(identity, msg)
            elif msg.kind is Kind.DONE:
                self._done(identity, msg)
            elif msg.kind is Kind.SAVED:
                self._saved(identity, msg)
            else:
                raise ProtocolError(ErrorCode.BAD_KIND, f"the coordinator does not serve {msg.kind.value!r}")
        except ProtocolError as exc:
            self._complaint(identity, exc.reason)
            self._reply(identity, error_reply(request_id, COORDINATOR, exc.code, exc.reason))
        except Exception as exc:  # whatever a peer sent, the coordinator goes on (a bug must not end the job)
            self._complaint(identity, f"internal error: {type(exc).__name__}: {exc}", logging.ERROR, exc_info=True)
            self._reply(identity, error_reply(request_id, COORDINATOR, ErrorCode.INTERNAL,
                                              f"coordinator: internal error ({type(exc).__name__})"))

    def _member(self, src: str) -> _Member | None:
        peer = parse_peer(src)
        return self.members.get(peer) if peer is not None else None

    def _register(self, identity: bytes, msg: Message) -> None:
        body = msg.body
        role, rank, pid, host = body.get("role"), body.get("rank", -1), body.get("pid", 0), body.get("host", "?")
        if not isinstance(role, str) or role not in self.expected:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"cannot register role {str(role)[:40]!r}: expected server or "
                                                      "worker")
        if type(rank) is not int or not -1 <= rank < 1 << 31:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"rank must be an integer >= -1, got {str(rank)[:40]}")
        if type(pid) is not int or not 0 <= pid < 1 << 31 or not isinstance(host, str) or len(host) > 255:
            raise ProtocolError(ErrorCode.BAD_HEADER, "'pid' must be a process id and 'host' a host name")
        rejoin = body.get("rejoin", False)
        if type(rejoin) is not bool:
            raise ProtocolError(ErrorCode.BAD_HEADER, "'rejoin' must be true or false")
        address = body.get("address")
        if role == "server" and not (isinstance(address, str) and address.startswith("tcp://") and len(address) < 300):
            raise ProtocolError(ErrorCode.BAD_HEADER, "a server must register with its 'address' (tcp://host:port)")
        if rejoin:
            self._rejoin(identity, msg, role, rank, host, pid, address if role == "server" else None)
            return
        if self.state is State.RECOVERING:
            raise ProtocolError(ErrorCode.RECOVERING, f"{role} cannot join now: the job is running and its coordinator "
                                                      f"restarted; nothing new can join until every member is back "
                                                      f"(waiting for {self._missing()})")
        if self.state is State.RUNNING:
            self._take_lost()  # a replacement can register before the next tick took its predecessor's failure
        replaced = self.members.get((role, rank)) if isinstance(rank, int) else None
        if (self.state is State.RUNNING and role == "worker" and replaced is not None and replaced.failed
                and self.job.on_worker_failure == "restart"):
            self._replace(identity, msg, replaced)
            return
        if role == "worker" and self.job.max_workers and (rank >= self.expected["worker"] or
                                                          (rank < 0 and self.state is State.RUNNING)):
            self._join(identity, msg, rank, host, pid)
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
        member = _Member(role, rank, identity, msg.id, host, pid, address if role == "server" else None)
        self.members[(role, rank)] = member
        self.monitor.joined(role, rank, host, pid)
        log.debug("registered %s", member.where())
        if role == "server" and not self.job.replicas:  # a server serves at once: it needs no other's address
            self._answer(member, ())
        if role == "server" and self._all_servers():
            if self.job.replicas:  # a primary forwards its updates to its backups: every server needs the others'
                servers = self._server_addresses()
                for m in self.members.values():
                    if m.role == "server":
                        self._answer(m, servers)
            self.servers_ready.set()
            if self.on_change is not None:
                self.on_change()
        if self._complete():
            self._start()

    def _complete(self) -> bool:
        """Every rank the job starts with registered (workers that join later are not waited for)."""
        return all((role, r) in self.members for role, count in self.expected.items() for r in range(count))

    def _join(self, identity: bytes, msg: Message, rank: int, host: str, pid: int) -> None:
        """--max-workers: a worker beyond --workers joins; once the job runs it gets the servers at once, and each
        server counts it from its next step (it is answered with everyone else when the job starts)."""
        if self.state in (State.FAILED, State.FINISHED):
            raise ProtocolError(ErrorCode.CONFLICT, f"worker cannot join: the job has {self.state.value}")
        limit, first = self.job.worker_ranks, self.expected["worker"]
        taken = {r for (role, r) in self.members if role == "worker"}
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
        member = _Member("worker", rank, identity, msg.id, host, pid, None)
        self.members[("worker", rank)] = member
        self.monitor.joined("worker", rank, host, pid)
        if self.state is not State.RUNNING:
            log.info("%s registered to join; it starts with the job", member.where())
            return
        self._notify_servers({"workers": {str(rank): pid}})
        self._answer(member, tuple(str(self.members[("server", r)].address) for r in range(self.expected["server"])))
        log.warning("%s joins the running job: %d live workers %s (--max-workers %d)", member.where(),
                    len(self._live_workers()), sorted(self._live_workers()), limit)

    def _rejoin(self, identity: bytes, msg: Message, role: str, rank: int, host: str, pid: int,
                address: str | None) -> None:
        """A member of the running job registers again: this coordinator restarted (and does not know it)."""
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
            self._reply(identity, Message(Kind.OK, id=msg.id, src=COORDINATOR))
            return
        if self.state is State.REGISTERING:
            if any(m.answered for m in self.members.values()):
                raise ProtocolError(ErrorCode.CONFLICT, f"{role} rank {rank} cannot rejoin: this coordinator has "
                                                        "started a new job")
            self._recover()
        elif self.state is not State.RECOVERING and not (self.state is State.RUNNING and rank >= self.expected[role]):
            raise ProtocolError(ErrorCode.CONFLICT, f"{role} rank {rank} is not a member of this job "
                                                    f"({self.state.value})")
        member = _Member(role, rank, identity, msg.id, host, pid, address, answered=True)
        self.members[(role, rank)] = member
        self.monitor.joined(role, rank, host, pid)
        self._reply(identity, Message(Kind.OK, id=msg.id, src=COORDINATOR))
        log.info("%s rejoined", member.where())
        if self.state is State.RECOVERING and self._complete():  # (a worker that had joined may come back later)
            self.state = State.RUNNING
            log.warning("every member of the job rejoined after %.1fs: it goes on",
                        time.monotonic() - self._recovering_since)
            self.servers_ready.set()
            self._progress()

    def _recover(self) -> None:
        """The first member of a running job rejoined: this coordinator restarted. Whoever registered as new is
        refused (nothing new joins a running job until its coordinator is back)."""
        reason = ("the job is running and its coordinator restarted; nothing new can join until every member is "
                  "back")
        for m in self.members.values():
            self._reply(m.identity, error_reply(m.request_id, COORDINATOR, ErrorCode.RECOVERING, reason))
        self.members.clear()
        self.state = State.RECOVERING
        self._recovering_since = time.monotonic()
        log.warning("a member of a running job rejoined: this coordinator restarted; waiting up to %.0fs "
                    "(--heartbeat-timeout) for the %d servers and %d workers to rejoin", self.heartbeat_timeout,
                    self.expected["server"], self.expected["worker"])

    def _replace(self, identity: bytes, msg: Message, old: _Member) -> None:
        """--on-worker-failure restart: a replacement takes a failed worker's rank, and the servers hear of it."""
        member = _Member("worker", old.rank, identity, msg.id, str(msg.body.get("host", "?")),
                         int(msg.body.get("pid", 0)), None)
        self.members[("worker", old.rank)] = member
        self.monitor.joined("worker", old.rank, member.host, member.pid)
        servers = self._server_addresses()
        self._notify_servers({"replaced": old.rank, "workers": {str(old.rank): member.pid}})
        self._answer(member, servers)
        log.warning("%s replaces the failed %s", member.where(), old.where())

    def lost(self, role: str, rank: int, why: str) -> None:
        """The launcher saw a process of the job fail (any thread may call this): acted on like a reported failure."""
        self._lost.append((role, rank, why))

    def _member_failed(self, member: _Member, why: str) -> None:
        """A member failed. A server, or a worker under --on-worker-failure abort: the job fails. Under shrink the
        servers stop waiting for the worker; under restart they wait for its replacement."""
        if member.failed or self.state in (State.FAILED, State.FINISHED):
            return
        member.failed = True
        self.monitor.ended(member.role, member.rank, failed=True)
        policy = self.job.on_worker_failure
        if member.role == "server" and self.job.replicas and self.state is State.RUNNING:
            self._failover(member, why)
            return
        if member.role == "server" or policy == "abort":
            self.failed_by = (member.role, member.rank)
            self._fail(f"{member.where()} failed: {why[:2000]}")
            return
        if policy == "shrink":
            member.done = True
            live = sorted(self._live_workers())
            log.warning("%s failed (%s); the job goes on with workers %s (--on-worker-failure shrink)",
                        member.where(), why[:500], live)
            self._notify_servers({"gone": member.rank, "why": why[:500]})
            self._release_barriers()
            self._complete_checkpoints()
            if not live:
                self._fail(f"every worker failed; the last was {member.where()}: {why[:2000]}")
        else:
            log.warning("%s failed (%s); waiting for its replacement (--on-worker-failure restart)", member.where(),
                        why[:500])

    def _failover(self, member: _Member, why: str) -> None:
        """--replicas: a server died. Each home it served goes to its first live copy; every member hears of it (a
        NOTICE with the new topology version); the job fails only when every copy of some home is lost."""
        self.dead_servers.add(member.rank)
        self.topology_version += 1
        self._failover_at = time.monotonic()
        routes = replicas.routes(self.job.replicas, self.job.num_servers, self.dead_servers)
        for held in self.holders.values():
            held.discard(member.rank)
        lost = [home for home, held in self.holders.items() if not held]
        if lost:
            self.failed_by = (member.role, member.rank)
            self._fail(f"{member.where()} failed: {why[:2000]}; every complete copy of the chunks of server(s) "
                       f"{', '.join(map(str, lost))} is lost (--replicas {self.job.replicas}; dead servers "
                       f"{sorted(self.dead_servers)}; a copy still being seeded when its primary died holds nothing)")
            return
        moved = {home: owner for home, owner in enumerate(routes) if home in self.dead_servers}
        log.warning("FAILOVER: %s failed (%s); topology version %d: %s; the job goes on", member.where(), why[:500],
                    self.topology_version, ", ".join(f"the chunks of server {h} are now served by server {o}"
                                                      for h, o in sorted(moved.items())))
        for m in self.members.values():
            if m.hb_identity is not None and not m.failed and not m.done:
                self._tell_topology(m, m.hb_identity)

    def _replicated(self, server: int) -> None:
        """--replicas: ``server`` reports every chunk it serves complete on all its live copies (re-replication after
        the newest failover is done there): those copies now count as holders."""
        routes = replicas.routes(self.job.replicas, self.job.num_servers, self.dead_servers)
        for home, owner in enumerate(routes):
            if owner != server or home not in self.holders:
                continue
            copies = set(replicas.live_copies(home, self.job.replicas, self.job.num_servers, self.dead_servers))
            if self.holders[home] != copies:
                self.holders[home] = copies
                log.warning("RE-REPLICATED: the chunks of server %d have %d complete copies again (servers %s; "
                            "topology version %d), %.2fs after the failover", home, len(copies), sorted(copies),
                            self.topology_version, time.monotonic() - self._failover_at)

    def _check_suspects(self, now: float) -> None:
        """--replicas: a server a worker lost its connection to is failed over as soon as its own heartbeats are late
        too (three intervals), not after the whole --heartbeat-timeout; one that heartbeats since is cleared."""
        late = 3 * self.job.heartbeat_interval
        for rank, (since, who) in list(self._suspects.items()):
            server = self.members.get(("server", rank))
            if server is None or server.failed or server.done or server.last_seen > since:
                del self._suspects[rank]
            elif now - server.last_seen > late and self.state is State.RUNNING:
                del self._suspects[rank]
                self._member_failed(server, f"{who} lost its connection to it and it has sent no heartbeat for "
                                            f"{now - server.last_seen:.1f}s")

    def _tell_topology(self, member: _Member, identity: bytes) -> None:
        """Send ``member`` the newest failover NOTICE (on its heartbeat channel; a member without one yet gets it
        with its next heartbeat)."""
        member.topology_version = self.topology_version
        self._reply(identity, Message(Kind.NOTICE, src=COORDINATOR,
                                      body=replicas.notice_body(self.topology_version, self.dead_servers)))

    def _notify_servers(self, body: dict[str, Any]) -> None:
        for m in self.members.values():
            if m.role == "server" and m.hb_identity is not None:
                self._reply(m.hb_identity, Message(Kind.NOTICE, src=COORDINATOR, body=body))

    def _server_addresses(self) -> tuple[str, ...]:
        return tuple(str(self.members[("server", r)].address) for r in range(self.expected["server"]))

    def _all_servers(self) -> bool:
        return all(("server", r) in self.members for r in range(self.expected["server"]))

    def _answer(self, member: _Member, servers: tuple[str, ...]) -> None:
        if servers and self.route is not None:
            servers = self.route(member.role, member.rank, servers)
        workers = max([self.job.num_workers] + [r + 1 for (role, r) in self.members if role == "worker"])
        body = Topology(member.role, member.rank, self.job.num_servers, workers, servers,
                        self.job.mode, self.job.staleness).to_body()
        member.last_seen = time.monotonic()
        member.answered = True
        self._reply(member.identity, Message(Kind.TOPOLOGY, id=member.request_id, src=COORDINATOR, body=body))

    def _start(self) -> None:
        """The cluster is complete: every worker gets the servers' addresses."""
        servers = self._server_addresses()
        # the servers learn each worker's pid first: a shared segment is mapped only from the worker that registered
        self._notify_servers({"workers": {str(m.rank): m.pid for (role, _), m in self.members.items()
                                          if role == "worker"}})
        for member in self.members.values():
            if not member.answered:
                self._answer(member, servers)
        self.state = State.RUNNING
        log.info("cluster complete: %d servers, %d workers", self.expected["server"], self.expected["worker"])

    def _unknown(self, src: str) -> ProtocolError:
        """A well-formed peer this coordinator does not know: a member of the job it ran before it restarted."""
        return ProtocolError(ErrorCode.UNKNOWN_MEMBER, f"{src[:40]} is not a member known to the coordinator (it "
                                                      "restarted?): register again with 'rejoin'")

    def _heartbeat(self, identity: bytes, msg: Message) -> None:
        member = self._member(msg.src)
        if member is None:
            if parse_peer(msg.src) is not None:  # (a stranger's, malformed, is ignored)
                self._reply(identity, error_reply(msg.id, COORDINATOR, ErrorCode.UNKNOWN_MEMBER,
                                                  self._unknown(msg.src).reason))
            return
        member.hb_identity = identity
        member.last_seen = time.monotonic()
        if member.topology_version < self.topology_version and not member.failed:
            self._tell_topology(member, identity)
        replicated = msg.body.get("replicated")
        if member.role == "server" and replicated == self.topology_version and type(replicated) is int:
            self._replicated(member.rank)
        suspect = msg.body.get("suspect")
        if self.job.replicas and member.role == "worker" and isinstance(suspect, list):
            for rank in suspect[: self.job.num_servers]:
                if type(rank) is int and 0 <= rank < self.job.num_servers:
                    self._suspects.setdefault(rank, (member.last_seen, member.name))
        if not member.done and not member.failed:
            self.monitor.report(member.role, member.rank, msg.body.get("stats"))
        if self.state is State.FAILED:
            self._reply(identity, error_reply(0, COORDINATOR, ErrorCode.DEAD, self.error or "the job failed"))
        elif self.state is State.FINISHED and member.role == "server":
            self._reply(identity, Message(Kind.SHUTDOWN, src=COORDINATOR))
        else:
            self._reply(identity, Message(Kind.OK, id=msg.id, src=COORDINATOR))

    def _barrier(self, identity: bytes, msg: Message) -> None:
        member = self._member(msg.src)
        if member is None and parse_peer(msg.src, "worker") is not None:
            raise self._unknown(msg.src)
        if member is None or member.role != "worker":
            raise ProtocolError(ErrorCode.BAD_HEADER, f"only registered workers take part in barriers, not "
                                                      f"{str(msg.src)[:40]!r}")
        name = msg.body.get("name", "default")
        if not isinstance(name, str) or len(name) > MAX_BARRIER_NAME:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"a barrier's name is a string of at most {MAX_BARRIER_NAME} "
                                                      "characters")
        if name not in self.barriers and len(self.barriers) >= MAX_BARRIERS:
            raise ProtocolError(ErrorCode.CONFLICT, f"{MAX_BARRIERS} barriers are open already; a job waits at one "
                                                    "or two at a time")
        started, arrived = self.barriers.setdefault(name, (time.monotonic(), {}))
        arrived[member.rank] = (identity, msg.id)
        self._release_barriers()

    def live_workers(self) -> set[int]:
        """The workers that have not finished (any thread may ask)."""
        return {r for (role, r), m in list(self.members.items()) if role == "worker" and not m.done}

    def _live_workers(self) -> set[int]:
        return {r for (role, r), m in self.members.items() if role == "worker" and not m.done}

    def _release_barriers(self) -> None:
        if self.state is State.RECOVERING:  # who is live is known once every member is back
            return
        live = self._live_workers()
        for name, (_, arrived) in list(self.barriers.items()):
            if live <= set(arrived):
                for identity, request_id in arrived.values():
                    self._reply(identity, Message(Kind.OK, id=request_id, src=COORDINATOR))
                del self.barriers[name]

    def _done(self, identity: bytes, msg: Message) -> None:
        member = self._member(msg.src)
        if member is None and parse_peer(msg.src) is not None:
            raise self._unknown(msg.src)
        self._reply(identity, Message(Kind.OK, id=msg.id, src=COORDINATOR))
        if member is None or member.done:
            return
        if not member.failed:
            self.monitor.report(member.role, member.rank, msg.body.get("stats"))
        failure = msg.body.get("failure")
        if msg.body.get("exit_code", 0) != 0 or failure is not None:
            self._member_failed(member, failure if isinstance(failure, str) else f"exit code "
                                                                                  f"{msg.body.get('exit_code')!r}")
            return
        member.done = True
        self.monitor.ended(member.role, member.rank, failed=False)
        log.debug("%s is done", member.name)
        if self.state is State.RUNNING:
            self._progress()

    def _progress(self) -> None:
        """Workers finished (or every member rejoined): release what waited for them; with no worker left, the job
        is over and the servers are told to shut down."""
        self._release_barriers()
        self._complete_checkpoints()
        if not self._live_workers():
            self.state = State.FINISHED
            self._finished_at = time.monotonic()
            for m in self.members.values():
                if m.role == "server" and m.hb_identity is not None:
                    self._reply(m.hb_identity, Message(Kind.SHUTDOWN, src=COORDINATOR))

    def status(self) -> dict[str, Any]:
        """The job's live view (the STATUS reply; ``zps top`` shows it)."""
        return {"state": self.state.value, "mode": self.job.mode, "num_servers": self.job.num_servers,
                "num_workers": self.job.num_workers, "error": self.error, "checkpoint": self.last_checkpoint,
                "dead_servers": sorted(self.dead_servers), "under_replicated": self._under_replicated(),
                **self.monitor.snapshot()}

    def _under_replicated(self) -> list[int]:
        """--replicas: the homes whose chunks have fewer complete copies than the live servers allow (being
        re-replicated)."""
        return [home for home, held in sorted(self.holders.items())
                if held != set(replicas.live_copies(home, self.job.replicas, self.job.num_servers, self.dead_servers))]

    # -- checkpoints -------------------------------------------------------------------------------------
    def _saved(self, identity: bytes, msg: Message) -> None:
        """A member wrote its part of a checkpoint; once every part is on disk, write the manifest."""
        member = self._member(msg.src)
        body = msg.body
        checkpoint, size, info = body.get("checkpoint"), body.get("size"), body.get("info")
        if member is None and self.job.checkpoint_dir and parse_peer(msg.src) is not None:
            raise self._unknown(msg.src)
        if member is None or not self.job.checkpoint_dir:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{msg.src!r} cannot report a checkpoint here")
        if type(checkpoint) is not int or checkpoint <= 0 or type(size) is not int or not isinstance(info, dict):
            raise ProtocolError(ErrorCode.BAD_HEADER, "a checkpoint report needs 'checkpoint' (int > 0), 'size' (int) "
                                                      "and 'info' (map)")
        file = ckpt.part_name(member.role, member.rank)  # the name is the coordinator's, not the reporter's
        self._reply(identity, Message(Kind.OK, id=msg.id, src=COORDINATOR))
        parts = self.checkpoints.setdefault(checkpoint, {})
        parts[(member.role, member.rank)] = {"rank": member.rank, "file": file, "size": size, **info}
        for old in sorted(self.checkpoints)[:-MAX_CHECKPOINTS_IN_FLIGHT]:  # never completed: forget them
            del self.checkpoints[old]
        self._complete_checkpoints()

    def _complete_checkpoints(self) -> None:
        """Write the manifest of every checkpoint whose parts are all on disk: those of the servers that hold keys
        (worker 0 names them) and of every worker still training (in ASP and SSP a worker that finished before it
        saw the request has no part; resuming, it starts where the servers' clocks say)."""
        if self.state is State.RECOVERING:  # which workers train is known once every member is back
            return
        for checkpoint in sorted(self.checkpoints):
            parts = self.checkpoints[checkpoint]
            workers = {r for (role, r), m in self.members.items() if role == "worker" and not m.done}
            holders = parts.get(("worker", 0), {}).get("servers")  # worker 0 says which servers hold keys
            if holders is None or not workers <= {r for role, r in parts if role == "worker"}:
                continue
            if not set(holders) <= {r for role, r in parts if role == "server"}:
                continue
            self._write_manifest(checkpoint, parts)

    def _write_manifest(self, checkpoint: int, parts: dict[tuple[str, int], dict[str, Any]]) -> None:
        settings = {"mode": self.job.mode, "num_servers": self.job.num_servers, "num_workers": self.job.num_workers,
                    "codec": self.job.codec, "pull_codec": self.job.pull_codec,
                    "error_feedback": self.job.error_feedback, "compress_min": self.job.compress_min}
        body = ckpt.manifest_body(checkpoint, settings,
                                  [p for (role, _), p in parts.items() if role == "server"],
                                  [p for (role, _), p in parts.items() if role == "worker"])
        try:
            ckpt.write_json(ckpt.directory(self.job.checkpoint_dir, checkpoint) / ckpt.MANIFEST, body)
            ckpt.prune(self.job.checkpoint_dir, self.job.keep, checkpoint)
        except OSError as exc:
            log.error("checkpoint %d: the manifest could not be written (%s); the previous checkpoint stays the "
                      "newest", checkpoint, exc)
            return
        for done in [c for c in self.checkpoints if c <= checkpoint]:
            del self.checkpoints[done]
        self.last_checkpoint = checkpoint
        log.info("checkpoint %d complete in %s", checkpoint, ckpt.directory(self.job.checkpoint_dir, checkpoint))

    def _servers_gone(self) -> bool:
        servers = [m for m in self.members.values() if m.role == "server"]
        if all(m.done or m.failed for m in servers):
            return True
        # servers that never answer the shutdown are the launcher's to end; do not wait for them forever
        return self._finished_at is not None and time.monotonic() - self._finished_at > self.heartbeat_timeout

    # -- deadlines -------------------------------------------------------------------------------------
    def _missing(self) -> str:
        parts = []
        for role, count in self.expected.items():
            missing = [r for r in range(count) if (role, r) not in self.members]
            if missing:
                parts.append(f"{len(missing)} of {count} {role}s (ranks {', '.join(map(str, missing))})")
        return "; ".join(parts)

    def _fail(self, reason: str) -> None:
        self.error = reason
        self.state = State.FAILED
        log.error("%s", reason)
        for m in self.members.values():
            if not m.answered:
                self._reply(m.identity, error_reply(m.request_id, COORDINATOR, ErrorCode.MISSING, reason))
            elif m.hb_identity is not None:
                self._reply(m.hb_identity, error_reply(0, COORDINATOR, ErrorCode.DEAD, reason))
        for _, arrived in self.barriers.values():
            for identity, request_id in arrived.values():
                self._reply(identity, error_reply(request_id, COORDINATOR, ErrorCode.DEAD, reason))

    def _take_lost(self) -> None:
        """Act on the failures the launcher reported (:meth:`lost`)."""
        while self._lost:
            role, rank, why = self._lost.popleft()
            lost = self.members.get((role, rank))
            if lost is not None:
                self._member_failed(lost, why)

    def _tick(self) -> None:
        now = time.monotonic()
        if self.state is State.REGISTERING:
            if now - self._started > self.timeout:
                self._fail(f"the cluster is incomplete after {self.timeout:.0f}s: waiting for {self._missing()}")
            return
        if self.state is State.RECOVERING and now - self._recovering_since > self.heartbeat_timeout:
            self._fail(f"the coordinator restarted and {self._missing()} did not rejoin within "
                       f"{self.heartbeat_timeout:.0f}s (--heartbeat-timeout)")
            return
        if self.state not in (State.RUNNING, State.RECOVERING):
            return
        self._take_lost()
        self._check_suspects(now)
        for m in list(self.members.values()):
            if not m.done and not m.failed and now - m.last_seen > self.heartbeat_timeout:
                self._member_failed(m, f"it stopped sending heartbeats {now - m.last_seen:.0f}s ago")
                if self.state is State.FAILED:
                    return
        live = self._live_workers()
        for name, (started, arrived) in list(self.barriers.items()):
            if now - started > self.timeout:
                # the workers that wait hear why (and fail, naming it); the job itself is not the barrier's to end:
                # a barrier anyone opened must not end it
                missing = sorted(live - set(arrived))
                reason = f"barrier {name[:100]!r} timed out after {self.timeout:.0f}s waiting for workers {missing}"
                log.error("%s", reason)
                for identity, request_id in arrived.values():
                    self._reply(identity, error_reply(request_id, COORDINATOR, ErrorCode.TIMEOUT, reason))
                del self.barriers[name]
