"""The coordinator (rendezvous) process's loop: receive, dispatch by kind, reply, and the deadlines between.

What a request means is its collaborator's: who is in the job and its state (:mod:`.membership`), ``--replicas``
failover (:mod:`.failover`), checkpoint manifests (:mod:`.manifests`), barriers (:mod:`.barriers`); the loop reads
each message, routes it, answers refusals with an ERROR that names the reason, and decides what a member's failure
means for the job (:meth:`Coordinator._member_failed`). Every wait has a deadline and ends with a message naming
who is missing ("waiting for 1 of 2 workers: ranks 1"). When a registered process stops sending heartbeats, every
other process is told (an ERROR notice on its heartbeat channel) and the coordinator fails; when every worker is
done, the servers are told to shut down.

A coordinator restarted on the same address (fresh state) rebuilds the membership of the running job: it answers
a member it does not know with :attr:`ErrorCode.UNKNOWN_MEMBER`; the member registers again with ``rejoin``, its
rank and (a server) its address; a member missing after ``--heartbeat-timeout`` fails the job, naming it.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from zps.protocol import security, transport
from zps.protocol.config import ConfigError, JobConfig
from zps.protocol.inflow import Inflow, limit_for
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError, error_reply, parse_frames
from zps.protocol.peers import COORDINATOR, parse_peer
from zps.protocol.security import Secrets
from zps.telemetry import metrics as prom
from zps.telemetry.complaints import Complaints
from zps.telemetry.monitor import Monitor, WorkerMetrics

from .barriers import Barriers
from .failover import Failover
from .manifests import Manifests
from .membership import Member, Membership, State, read_registration

log = logging.getLogger("zps.coordinator")


class Coordinator:
    """Serves one job. ``serve()`` returns 0 when every worker finished and 1 on failure (see ``error``)."""

    def __init__(self, job: JobConfig, host: str = "127.0.0.1", port: int = 0,
                 context: zmq.Context | None = None, secrets: Secrets | None = None) -> None:
        self.job = job
        if job.secure and secrets is None:
            raise ConfigError("ZPS_SECURE (--secure) is set but the coordinator was given no keys")
        self.secrets = secrets
        self.timeout, self.heartbeat_timeout = job.timeout, job.heartbeat_timeout
        self.context = context or zmq.Context.instance()
        self.sock = security.router(self.context, secrets)
        self.sock.setsockopt(zmq.MAXMSGSIZE, job.max_header_bytes)  # its messages are headers only
        self.inflow = Inflow(self.sock, limit_for(job.max_header_bytes), "coordinator", curve=secrets is not None)
        if port:
            self.sock.bind(transport.tcp_address(host, port))
            self.address = transport.tcp_address(host, port)
        else:
            self.address = transport.bind_free(self.sock, host)
        self.endpoint = self.address.removeprefix("tcp://")  # host:port, the value of ZPS_COORDINATOR
        self.failed_by: tuple[str, int] | None = None  # the member whose reported failure failed the job
        self._lost: collections.deque[tuple[str, int, str]] = collections.deque()  # from the launcher
        self._complaint = Complaints(log, "coordinator")  # refusals, logged once per peer per minute
        self._stop = threading.Event()
        self.monitor = Monitor(job.straggler_factor)
        self.registry = CollectorRegistry()
        self.registry.register(WorkerMetrics(self.monitor))
        self._metrics_host = host

        def send(identity: bytes, msg: Message) -> None:  # (late-bound: a test may replace _reply)
            self._reply(identity, msg)

        self.membership = Membership(job, send, self.monitor)
        self.failover = Failover(job, send)
        self.manifests = Manifests(job)
        self.barriers = Barriers(job.timeout, send)

    # -- public ----------------------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self.membership.state

    @property
    def error(self) -> str | None:
        return self.membership.error

    @property
    def members(self) -> dict[tuple[str, int], Member]:
        return self.membership.members

    @property
    def servers_ready(self) -> threading.Event:
        """Set once every server registered (and serves): the workers may start."""
        return self.membership.servers_ready

    @property
    def on_change(self) -> Callable[[], None] | None:
        """Called when :attr:`servers_ready` is set."""
        return self.membership.on_change

    @on_change.setter
    def on_change(self, callback: Callable[[], None] | None) -> None:
        self.membership.on_change = callback

    @property
    def route(self) -> Callable[[str, int, tuple[str, ...]], tuple[str, ...]] | None:
        """The servers' addresses as a member is to see them (--net: a worker's, through its emulated links)."""
        return self.membership.route

    @route.setter
    def route(self, route: Callable[[str, int, tuple[str, ...]], tuple[str, ...]] | None) -> None:
        self.membership.route = route

    def live_workers(self) -> set[int]:
        """The workers that have not finished (any thread may ask)."""
        return self.membership.live_workers()

    def lost(self, role: str, rank: int, why: str) -> None:
        """The launcher saw a process of the job fail (any thread may call this): acted on like a reported failure."""
        self._lost.append((role, rank, why))

    def stop(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any]:
        """The job's live view (the STATUS reply; ``zps top`` shows it)."""
        return {"state": self.state.value, "mode": self.job.mode, "num_servers": self.job.num_servers,
                "num_workers": self.job.num_workers, "replicas": self.job.replicas, "error": self.error,
                "checkpoint": self.manifests.last,
                "dead_servers": sorted(self.failover.dead), "under_replicated": self.failover.under_replicated(),
                **self.monitor.snapshot()}

    def serve(self) -> int:
        metrics = prom.serve(self.registry, prom.bind_address(self.job.metrics_host, self._metrics_host),
                             prom.metrics_port(self.job.metrics_port, "coordinator", 0), "coordinator")
        try:
            while not self._stop.is_set():
                if self.sock.poll(100):
                    for _ in range(256):
                        try:
                            frames = transport.recv_bounded(self.sock, 8, self.job.max_header_bytes, self.inflow)
                        except zmq.Again:
                            break
                        except transport.TooLarge as exc:
                            self._complaint(exc.identity, str(exc))
                            continue
                        self._handle(frames)
                self._tick()
                if self.state is State.FAILED:
                    return 1
                if self.state is State.FINISHED and self.membership.servers_gone(self.heartbeat_timeout):
                    return 0
            return 0 if self.state is State.FINISHED else 1
        finally:
            self.inflow.close()
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
            msg = parse_frames(frames[1:], header_limit=self.job.max_header_bytes, max_keys=0)  # (bodies only)
            request_id = msg.id
            if self.secrets is not None:  # a key speaks only as its own process (and registers only as it)
                body = msg.body
                claimed = f"{body.get('role')}:{body.get('rank')}" if msg.kind is Kind.REGISTER else msg.src
                security.check_sender(frames[0], claimed)
                if claimed == security.OBSERVER and msg.kind is not Kind.STATUS:
                    raise ProtocolError(ErrorCode.BAD_KIND, "the observer's key asks for the job's status, nothing "
                                                            "else")
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

    def _register(self, identity: bytes, msg: Message) -> None:
        request = read_registration(msg.body)
        if request.rejoin:
            if self.membership.rejoin(identity, msg.id, request):
                self._progress()
            return
        if self.state is State.RUNNING:
            self._take_lost()  # a replacement can register before the next tick took its predecessor's failure
        self.membership.register(identity, msg.id, request)

    def _heartbeat(self, identity: bytes, msg: Message) -> None:
        member = self.membership.member(msg.src)
        if member is None:
            if parse_peer(msg.src) is not None:  # (a stranger's, malformed, is ignored)
                self._reply(identity, error_reply(msg.id, COORDINATOR, ErrorCode.UNKNOWN_MEMBER,
                                                  self.membership.unknown(msg.src).reason))
            return
        member.hb_identity = identity
        member.last_seen = time.monotonic()
        if member.topology_version < self.failover.version and (not member.failed or member.role == "server"):
            self.failover.tell(member, identity)  # (a server failed over that still runs hears it: it stops serving)
        replicated = msg.body.get("replicated")
        if member.role == "server" and replicated == self.failover.version and type(replicated) is int:
            self.failover.replicated(member.rank)
        suspect = msg.body.get("suspect")
        if self.job.replicas and member.role == "worker" and isinstance(suspect, list):
            self.failover.suspect(suspect, member.last_seen, member.name)
        if not member.done and not member.failed:
            self.monitor.report(member.role, member.rank, msg.body.get("stats"))
        if self.state is State.FAILED:
            self._reply(identity, error_reply(0, COORDINATOR, ErrorCode.DEAD, self.error or "the job failed"))
        elif self.state is State.FINISHED and member.role == "server":
            self._reply(identity, Message(Kind.SHUTDOWN, src=COORDINATOR))
        else:
            self._reply(identity, Message(Kind.OK, id=msg.id, src=COORDINATOR))

    def _barrier(self, identity: bytes, msg: Message) -> None:
        member = self.membership.member(msg.src)
        if member is None and parse_peer(msg.src, "worker") is not None:
            raise self.membership.unknown(msg.src)
        if member is None or member.role != "worker":
            raise ProtocolError(ErrorCode.BAD_HEADER, f"only registered workers take part in barriers, not "
                                                      f"{str(msg.src)[:40]!r}")
        self.barriers.arrive(msg.body.get("name", "default"), member.rank, identity, msg.id)
        self._release_barriers()

    def _done(self, identity: bytes, msg: Message) -> None:
        member = self.membership.member(msg.src)
        if member is None and parse_peer(msg.src) is not None:
            raise self.membership.unknown(msg.src)
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

    def _saved(self, identity: bytes, msg: Message) -> None:
        """A member wrote its part of a checkpoint; once every part is on disk, the manifest is written."""
        member = self.membership.member(msg.src)
        body = msg.body
        checkpoint, size, info = body.get("checkpoint"), body.get("size"), body.get("info")
        if member is None and self.job.checkpoint_dir and parse_peer(msg.src) is not None:
            raise self.membership.unknown(msg.src)
        if member is None or not self.job.checkpoint_dir:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{msg.src!r} cannot report a checkpoint here")
        if type(checkpoint) is not int or checkpoint <= 0 or type(size) is not int or not isinstance(info, dict):
            raise ProtocolError(ErrorCode.BAD_HEADER, "a checkpoint report needs 'checkpoint' (int > 0), 'size' (int) "
                                                      "and 'info' (map)")
        self._reply(identity, Message(Kind.OK, id=msg.id, src=COORDINATOR))
        self.manifests.saved(member.role, member.rank, checkpoint, size, info)
        self._complete_checkpoints()

    # -- what a change means for the job -------------------------------------------------------------------
    def _release_barriers(self) -> None:
        if self.state is not State.RECOVERING:  # who is live is known once every member is back
            self.barriers.release(self.membership.live_workers())

    def _complete_checkpoints(self) -> None:
        if self.state is not State.RECOVERING:  # which workers train is known once every member is back
            self.manifests.complete(self.membership.live_workers())

    def _progress(self) -> None:
        """Workers finished (or every member rejoined): release what waited for them; with no worker left, the job
        is over and the servers are told to shut down."""
        self._release_barriers()
        self._complete_checkpoints()
        if not self.membership.live_workers():
            self.membership.finish()

    def _fail(self, reason: str) -> None:
        self.membership.fail(reason)
        self.barriers.fail(reason)

    def _take_lost(self) -> None:
        """Act on the failures the launcher reported (:meth:`lost`)."""
        while self._lost:
            role, rank, why = self._lost.popleft()
            lost = self.members.get((role, rank))
            if lost is not None:
                self._member_failed(lost, why)

    def _member_failed(self, member: Member, why: str) -> None:
        """A member failed. A server under --replicas while the job runs: failed over. A server, or a worker under
        --on-worker-failure abort: the job fails. Under shrink the servers stop waiting for the worker; under restart
        they wait for its replacement."""
        if not self.membership.mark_failed(member):
            return
        policy = self.job.on_worker_failure
        if member.role == "server" and self.job.replicas and self.state is State.RUNNING:
            lost = self.failover.server_failed(member, why, self.members.values())
            if lost:
                self.failed_by = (member.role, member.rank)
                self._fail(f"{member.where()} failed: {why[:2000]}; every complete copy of the chunks of server(s) "
                           f"{', '.join(map(str, lost))} is lost (--replicas {self.job.replicas}; dead servers "
                           f"{sorted(self.failover.dead)}; a copy still being seeded when its primary died holds "
                           "nothing)")
            return
        if member.role == "server" or policy == "abort":
            self.failed_by = (member.role, member.rank)
            self._fail(f"{member.where()} failed: {why[:2000]}")
            return
        if policy == "shrink":
            member.done = True
            live = sorted(self.membership.live_workers())
            log.warning("%s failed (%s); the job goes on with workers %s (--on-worker-failure shrink)",
                        member.where(), why[:500], live)
            self.membership.notify_servers({"gone": member.rank, "why": why[:500]})
            self._release_barriers()
            self._complete_checkpoints()
            if not live:
                self._fail(f"every worker failed; the last was {member.where()}: {why[:2000]}")
        else:
            log.warning("%s failed (%s); waiting for its replacement (--on-worker-failure restart)", member.where(),
                        why[:500])

    # -- deadlines -------------------------------------------------------------------------------------
    def _tick(self) -> None:
        now = time.monotonic()
        membership = self.membership
        if self.state is State.REGISTERING:
            if now - membership.started > self.timeout:
                self._fail(f"the cluster is incomplete after {self.timeout:.0f}s: waiting for {membership.missing()}")
            return
        if self.state is State.RECOVERING and now - membership.recovering_since > self.heartbeat_timeout:
            self._fail(f"the coordinator restarted and {membership.missing()} did not rejoin within "
                       f"{self.heartbeat_timeout:.0f}s (--heartbeat-timeout)")
            return
        if self.state not in (State.RUNNING, State.RECOVERING):
            return
        self._take_lost()
        servers = {r: m for (role, r), m in self.members.items() if role == "server"}
        for server, why in self.failover.due_suspects(now, servers, self.state is State.RUNNING):
            self._member_failed(server, why)
        for m in list(self.members.values()):
            if not m.done and not m.failed and now - m.last_seen > self.heartbeat_timeout:
                self._member_failed(m, f"it stopped sending heartbeats {now - m.last_seen:.0f}s ago")
                if self.state is State.FAILED:
                    return
        self.barriers.expire(now, membership.live_workers())
