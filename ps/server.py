"""The parameter-server process: it registers with the coordinator, then runs a ZeroMQ ROUTER loop around the
shard service (:class:`.shard.Shard`), which knows no socket.

The loop receives, sends and keeps time: one message goes :meth:`Loop.serve` -> :meth:`Loop._handle` (parse, check
the sender, the guard) -> :meth:`.shard.Shard.handle` (read, handle, re-check what waits) -> :meth:`Loop._send` for
each reply. Every request is validated in full before any state changes: a message with one bad key changes
nothing and gets an ERROR reply naming the problem (:class:`._guard.Guard`), and the loop keeps serving. Its
timers: the waiting requests' deadlines, the optimizer state's size once per heartbeat, ``--metrics-out`` records,
``--kill`` and giving freed memory back to the OS.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from zps.protocol import security, transport
from zps.protocol.config import Config
from zps.protocol.inflow import Inflow, limit_for
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError, error_reply, parse_frames
from zps.protocol.peers import peer_name
from zps.protocol.plan import MAX_KEYS_PER_MESSAGE
from zps.protocol.rendezvous import RendezvousClient, RendezvousError, Topology
from zps.protocol.simulation import parse_kills
from zps.telemetry import metrics as prom
from zps.telemetry.stepmetrics import MetricsFile
from zps.telemetry.trace import Tracer

from ._checkpoint import Checkpoints
from ._guard import Guard
from ._metrics import Recorder, ServerMetrics
from ._pending import Reply
from ._replicas import Replication
from .shard import Shard

log = logging.getLogger("zps.server")

MAX_KEYS_SERVED = 2 * MAX_KEYS_PER_MESSAGE  # key entries of one message (a worker puts in at most half as many)

# Freed message buffers and optimizer temporaries go back to the OS when the server has been idle this long, or
# after this many bytes under continuous load (trimming more often makes the next messages fault pages in again).
_TRIM_WHEN_IDLE = 0.2
_TRIM_BACKSTOP = 1 << 30


def _malloc_trim() -> Callable[[], None]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        return lambda: None


# Message buffers are freed after each request, but glibc may keep the pages: give them back now and then, so the
# server's resident memory stays close to parameters + optimizer state (a few ms per call).
release_free_memory = _malloc_trim()


def _warm_up() -> None:
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


class Server:
    """One shard server. ``run()`` registers with the coordinator and serves until told to shut down."""

    def __init__(self, config: Config, context: zmq.Context | None = None, stop: threading.Event | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.stop = stop or threading.Event()
        self.name = "server:?"
        self.kill: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGKILL)  # --kill
        self._loop: Loop | None = None
        self.inflow: Inflow | None = None  # the watch of the socket's connections, from run()

    @property
    def shard(self) -> Shard:
        """The shard service (there is none before the server registered)."""
        if self._loop is None:
            raise RuntimeError(f"{self.name} has not registered: it serves no shard yet")
        return self._loop.shard

    def run(self) -> int:
        sock = security.router(self.context, self.config.secrets)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.job.max_message_bytes)  # ZeroMQ drops a peer that sends more
        # and a connection whose message (of any number of parts) would hold more is cut: zps.protocol.inflow
        self.inflow = Inflow(sock, limit_for(self.config.job.max_message_bytes), "server",
                             curve=self.config.secrets is not None)
        address = transport.bind_free(sock, self.config.host)
        rendezvous = RendezvousClient(self.config, self.context)
        loop: Loop | None = None
        failure: str | None = None
        try:
            try:
                topology = rendezvous.register(address)
            except RendezvousError as exc:
                log.error("%s could not join the cluster: %s", self.name, exc.reason)
                return 1
            self.name = peer_name("server", topology.rank)
            loop = self._loop = Loop(self, sock, rendezvous, topology)
            log.info("%s serving at %s (%s)", self.name, address, topology.mode)
            # torch builds its first optimizer slowly (it imports its compiler then): do that now, beside the
            # loop, not when the first INIT is waiting for it
            threading.Thread(target=_warm_up, name="zps-warm-up", daemon=True).start()
            try:
                loop.serve()
            except Exception as exc:  # a bug in the loop: the job fails naming it, never takes this for an end
                log.exception("%s: its loop failed", self.name)
                failure = f"{self.name}: internal error: {type(exc).__name__}: {exc}"
                return 1
            if rendezvous.failure:
                log.error("%s: %s", self.name, rendezvous.failure)
                return 1
            return 0
        finally:
            if loop is not None:
                loop.finish()
            rendezvous.done(failure)
            rendezvous.close()
            self.inflow.close()
            self.inflow = None
            sock.close(linger=0)
            if loop is not None:
                loop.close()


class Loop:
    """The loop of ``server`` once registered: its socket, the other servers' (``--replicas``), its timers, and the
    shard service it feeds."""

    def __init__(self, server: Server, sock: zmq.Socket, rendezvous: RendezvousClient, topology: Topology) -> None:
        job = server.config.job
        self.server, self.sock, self.rendezvous, self.job = server, sock, rendezvous, job
        self.name = name = peer_name("server", topology.rank)
        self.metrics = ServerMetrics(name)
        self.guard = Guard(name, self.metrics)
        self.tracer = Tracer(job.trace, "server", topology.rank)
        # --replicas: a DEALER to each other server (updates, seeds); under --secure it speaks CURVE with this
        # server's own key, which the others' ZAP handlers name server:N
        self.peers: dict[int, zmq.Socket] = {}
        if job.replicas:
            for peer, peer_address in enumerate(topology.servers):
                if peer != topology.rank:
                    self.peers[peer] = peer_sock = security.dealer(server.context, server.config.secrets)
                    transport.connect(peer_sock, peer_address)
        replication = Replication(topology.rank, topology.num_servers, job.replicas, name, self._send_peer,
                                  self.metrics)
        checkpoints = None
        if job.checkpoint_dir:
            checkpoints = Checkpoints(job.checkpoint_dir, topology.rank, topology.mode, rendezvous.report_saved,
                                      self.metrics.checkpoint.observe)
        self.shard = Shard(name, job, topology, self.metrics, self.guard, replication, checkpoints, self.tracer)
        self.recorder = Recorder(MetricsFile(job.metrics_out, "server", topology.rank), self.metrics, self.shard.step)
        rendezvous.reporter = self.metrics.report
        self.metrics_server = prom.serve(self.metrics.registry, prom.bind_address(job.metrics_host, server.config.host),
                                         prom.metrics_port(job.metrics_port, "server", topology.rank), name)
        self._kill_at = parse_kills(job.kill).get(("server", topology.rank)) if job.kill else None
        self._kill_seen: int | None = None  # the applied step when the loop last looked
        self._started: dict[tuple[bytes, int], tuple[str, float]] = {}  # request -> (kind, arrival): its latency
        self._since_trim = 0  # bytes received since freed memory was last given back
        self._last_request = time.monotonic()
        self._measured = 0.0  # when the optimizer state is measured next

    def serve(self) -> None:
        sock, shard, rendezvous = self.sock, self.shard, self.rendezvous
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        for peer in self.peers.values():  # --replicas: the backups' acknowledgements
            poller.register(peer, zmq.POLLIN)
        while not self.server.stop.is_set() and not rendezvous.shutdown_requested.is_set():
            wait_ms = 100
            soonest = shard.pending.soonest()
            if soonest is not None:
                wait_ms = max(0, min(wait_ms, int((soonest - time.monotonic()) * 1000) + 1))
            if poller.poll(wait_ms):
                # drain what is queued before checking deadlines again
                for _ in range(256):
                    if not transport.readable(sock):
                        break
                    self._receive()
            elif self._since_trim and time.monotonic() - self._last_request >= _TRIM_WHEN_IDLE:
                self._trim()
            if self.peers:
                self._peer_answers()
                if shard.replication.fenced is not None:
                    rendezvous.failure = f"{self.name}: {shard.replication.fenced}; it stops serving"
                    break
                rendezvous.report_replicated(shard.replication.replicated)
            self._notices()
            if len(shard.pending):
                self._send_all(shard.pending.expire(self.job.timeout))
            if time.monotonic() >= self._measured:  # once per heartbeat
                self._measured = time.monotonic() + self.job.heartbeat_interval
                shard.measure()
            self.recorder.tick()
            if self._kill_at is not None:
                self._maybe_kill()
        if shard.replication.fenced is not None:  # failed over (rightly or not): the new primaries serve these
            self._send_all(shard.pending.fail_all(f"failed over ({shard.replication.fenced}): send it again to the "
                                                  "new primary", ErrorCode.MOVED))
        self._send_all(shard.pending.fail_all(rendezvous.failure or "the job is shutting down"))

    def finish(self) -> None:
        """The job ends: a checkpoint being written is not thrown away; the ``end`` record is written."""
        if self.shard.checkpoints is not None:
            self.shard.checkpoints.wait(self.job.timeout)
        self.recorder.end()

    def close(self) -> None:
        for peer in self.peers.values():
            peer.close(linger=0)
        if self.metrics_server is not None:
            self.metrics_server.close()
        try:
            self.tracer.write()
        except OSError as exc:
            log.error("%s: the trace could not be written: %s", self.name, exc)

    # -- receiving -------------------------------------------------------------------------------------
    def _receive(self) -> None:
        try:
            frames = transport.recv_bounded(self.sock, transport.MAX_FRAMES, self.job.max_message_bytes,
                                            self.server.inflow)
        except transport.TooLarge as exc:
            self.metrics.failed += 1
            self._send(exc.identity, error_reply(0, self.name, ErrorCode.TOO_LARGE, str(exc)))
            return
        received = sum(len(f) for f in frames[2:])
        self.metrics.payload["in"] += received
        self.metrics.wire[("in", "tcp")] += received + len(frames[1])
        self._handle(frames)
        self._since_trim += 1 + received
        del frames  # the message's buffers are free from here on
        self._last_request = time.monotonic()
        if self._since_trim >= _TRIM_BACKSTOP:
            self._trim()

    def _handle(self, frames: list[Any]) -> None:
        """Serve one message; whatever it holds, the loop goes on (an exception becomes an ERROR reply)."""
        self.metrics.received += 1
        self._notices()  # the coordinator's news first (a worker's pid before its INIT)
        identity = transport.frame_bytes(frames[0])
        request_id = 0
        try:
            msg = parse_frames(frames[1:], header_limit=self.job.max_header_bytes, max_keys=MAX_KEYS_SERVED)
            request_id = msg.id
            if self.server.config.secrets is not None:
                security.check_sender(frames[0], msg.src)
            self._arrived(identity, msg)
            replies = self.shard.handle(identity, msg)
        except ProtocolError as exc:
            replies = [(identity, self.guard.refuse(identity, request_id, exc))]
        except Exception as exc:  # a bug must not take the server down; the worker hears about it
            replies = [(identity, self.guard.fail(identity, request_id, exc))]
        self._send_all(replies)

    def _arrived(self, identity: bytes, msg: Message) -> None:
        """Count a parsed request and note when it came (its reply observes the latency)."""
        kind = msg.kind.value
        self.metrics.requests[kind] += 1
        if len(self._started) >= 4 * self.job.max_pending + 1024:  # replies that never came: forget them
            self._started.pop(next(iter(self._started)))
        self._started[(identity, msg.id)] = (kind, time.monotonic())

    def _notices(self) -> None:
        """The coordinator's notices (heard on the heartbeat channel), in order."""
        notices = self.rendezvous.notices
        while notices:
            self._send_all(self.shard.notice(notices.popleft()))

    def _peer_answers(self) -> None:
        """--replicas: the backups' answers to updates and seeds; what waited for them goes on."""
        replication, acknowledged = self.shard.replication, set()
        for backup, peer in self.peers.items():
            while transport.readable(peer):
                try:
                    msg = transport.recv(peer)
                except ProtocolError as exc:
                    log.error("%s: an unreadable answer from server %d: %s", self.name, backup, exc)
                    continue
                acknowledged |= replication.answered(backup, msg)
        if replication.reseed:
            self.shard.send_seeds()
        if acknowledged:
            self._send_all(self.shard.acknowledged(acknowledged))

    # -- sending ---------------------------------------------------------------------------------------
    def _send_all(self, replies: list[Reply]) -> None:
        for identity, msg in replies:
            self._send(identity, msg)

    def _send(self, identity: bytes, msg: Message) -> None:
        """Send a reply; one that cannot be built or sent is logged and dropped, never the end of the loop."""
        try:
            frames = msg.to_frames()
        except Exception as exc:  # e.g. a value msgpack cannot pack; the peer's request then times out, naming us
            self.metrics.failed += 1
            log.error("%s: a reply (%s) could not be built: %s: %s", self.name, msg.describe(), type(exc).__name__,
                      exc)
            return
        # counted before the send: a peer that got the reply reads counters that include it
        self.metrics.payload["out"] += transport.size_of(frames[1:])
        self.metrics.wire[("out", "tcp")] += transport.size_of(frames)
        if msg.kind is Kind.ERROR:
            self.metrics.errors[str(msg.body.get("code", "internal"))] += 1
        started = self._started.pop((identity, msg.id), None)
        if started is not None:
            self.metrics.observe_latency(started[0], time.monotonic() - started[1])
        try:
            transport.send_frames(self.sock, frames, identity)
        except zmq.ZMQError as exc:
            self.metrics.failed += 1
            log.error("%s: a reply (%s) could not be sent: %s", self.name, msg.describe(), exc)

    def _send_peer(self, server: int, msg: Message) -> None:
        """--replicas: an update or seed for another server (one that cannot be sent is never acknowledged: what
        waits for it times out, naming it)."""
        try:
            transport.send(self.peers[server], msg)
        except zmq.ZMQError as exc:
            log.error("%s: a %s for server %d could not be sent: %s", self.name, msg.kind.value, server, exc)

    # -- timers ----------------------------------------------------------------------------------------
    def _trim(self) -> None:
        self._since_trim = 0
        release_free_memory()

    def _maybe_kill(self) -> None:
        """--kill server:R@S: SIGKILL as the applied step reaches S (a server that starts past it, resumed from a
        checkpoint, is not killed again)."""
        now = self.shard.step()
        if self._kill_seen is not None and self._kill_seen < self._kill_at <= now:  # type: ignore[operator]
            log.warning("%s: killed at step %d (--kill)", self.name, now)
            self._kill_at = None
            self.server.kill()
        self._kill_seen = now


def serve(config: Config) -> int:
    """Run one parameter server for ``config`` until the job ends; its exit code."""
    return Server(config).run()
