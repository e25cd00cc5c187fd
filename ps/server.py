"""The parameter-server process: a ZeroMQ ROUTER loop over the shard store.

Every request is validated in full before any state changes: a message with one bad key changes nothing and
gets an ERROR reply naming the problem, and the loop keeps serving. Requests that cannot be answered yet (BSP
versions, SSP clocks, keys not yet initialised) wait with a deadline (:mod:`._pending`); VALUES replies are built
by :mod:`._values`, the same-host shared areas are :mod:`._shm`'s.
"""
from __future__ import annotations

import collections
import ctypes
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from zps.protocol import checkpoint as ckpt
from zps.protocol import metrics as prom
from zps.protocol import replicas, security, transport
from zps.protocol.bodies import read_join, read_notice, read_push
from zps.protocol.complaints import Complaints
from zps.protocol.config import Config
from zps.protocol.messages import ErrorCode, KeyEntry, Kind, Message, ProtocolError, error_reply, parse_frames
from zps.protocol.peers import parse_peer, peer_name
from zps.protocol.progress import cpu_seconds, rss_bytes
from zps.protocol.rendezvous import RendezvousClient, RendezvousError, Topology
from zps.protocol.shm import PULL, PUSH
from zps.protocol.simulation import parse_kills
from zps.protocol.stepmetrics import MetricsFile
from zps.protocol.tensors import DTYPES, Decoders, FusedReader, dtype_from_name
from zps.protocol.trace import Tracer, now_us

from ._checkpoint import Checkpoints, Restore
from ._metrics import GAUGES, ServerMetrics
from ._pending import Pending, Waiting
from ._replicas import Replication, keys_text, read_replicate
from ._seeds import read_seed
from ._shm import WorkerSegments
from ._values import PullRequest, Values
from .consistency import Consistency, make_consistency
from .optim import build_optimizer, clean_hparams, optimizer_class
from .store import KeyState, Optimizers

log = logging.getLogger("zps.server")

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
        self.keys: dict[int, KeyState] = {}
        self.optimizers = Optimizers()
        self.consistency: Consistency | None = None
        self.topology: Topology | None = None
        self.name = "server:?"
        self._decoders = Decoders((config.job.codec, config.job.pull_codec))
        self.segments = WorkerSegments()
        self.counters = {"requests": 0, "errors": 0, "pushes_applied": 0, "duplicates": 0, "bytes_in": 0,
                         "bytes_out": 0, "shm_bytes_in": 0, "shm_bytes_out": 0}
        self.metrics = ServerMetrics(self.name, self._gauges)
        self.tracer = Tracer()  # --trace: enabled once the rank is known
        self.values = Values(self.name, self.segments, self.counters, self.metrics, snapshot=config.job.mode != "bsp")
        self._sock: zmq.Socket | None = None
        self.checkpoints: Checkpoints | None = None  # with --checkpoint-dir, once the rank is known
        self._notices: collections.deque[dict[str, Any]] = collections.deque()  # the coordinator's, once registered
        self._restore: Restore | None = None  # with --resume, opened at the first INIT that needs it
        self.pending = Pending(self._send, self.name, config.job.max_pending)
        self.replication = Replication(0, 1, 0, self.context, (), self.name)  # --replicas: set up once registered
        self.complain = Complaints(log, self.name)  # refusals, logged once per peer per minute
        # what the message being handled changed: the keys it updated or set, or everything (None: a worker left,
        # SSP's slowest clock moved); the requests waiting on it are re-checked after the message
        self._changed: set[int] | None = set()
        self._bytes = 0  # of the parameters declared here (the cap --max-server-bytes)
        self._optimizer: tuple[str, list[dict[str, Any]]] | None = None  # as rank 0 declared it (or a seed named it)
        self._workers: dict[str, int] = {}  # src -> worker rank, once checked
        self._since_trim = 0  # bytes received since freed memory was last given back
        self._last_request = time.monotonic()
        self._started: dict[tuple[bytes, int], tuple[str, float]] = {}  # request -> (kind, arrival): its latency
        self._first_push: dict[int, float] = {}  # BSP: key -> when the first push of its current step came
        self._optimizer_bytes = 0  # of the torch.optim state, measured by the loop now and then
        self._measured = 0.0
        # --metrics-out: seconds of work since the job began, a record per second; --kill
        self.out = MetricsFile("", "server", -1)
        self.timing = {"apply": 0.0, "decode": 0.0, "encode": 0.0}
        self._recorded: dict[str, float] = {}
        self._record_at = 0.0
        self._kill_at: int | None = None
        self._kill_seen: int | None = None  # the applied step when the loop last looked
        self.kill: Callable[[], None] = lambda: os.kill(os.getpid(), signal.SIGKILL)

    # -- lifecycle -------------------------------------------------------------------------------------
    def run(self) -> int:
        sock = self._sock = security.router(self.context, self.config.secrets)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.job.max_message_bytes)  # ZeroMQ drops a peer that sends more
        address = transport.bind_free(sock, self.config.host)
        rendezvous = RendezvousClient(self.config, self.context)
        self._notices = rendezvous.notices
        metrics_server: prom.MetricsServer | None = None
        failure: str | None = None
        try:
            try:
                self.topology = rendezvous.register(address)
            except RendezvousError as exc:
                log.error("%s could not join the cluster: %s", self.name, exc.reason)
                return 1
            self.name = self.pending.name = self.values.name = self.complain.who = peer_name("server",
                                                                                              self.topology.rank)
            self.metrics.server = self.name
            self.out = MetricsFile(self.config.job.metrics_out, "server", self.topology.rank)
            if self.config.job.kill:
                self._kill_at = parse_kills(self.config.job.kill).get(("server", self.topology.rank))
            self.tracer = Tracer(self.config.job.trace, "server", self.topology.rank)
            rendezvous.reporter = self._report
            self.replication = Replication(self.topology.rank, self.topology.num_servers, self.config.job.replicas,
                                           self.context, self.topology.servers, self.name)
            metrics_server = prom.serve(self.metrics.registry, self.config.host,
                                        prom.metrics_port(self.config.job.metrics_port, "server", self.topology.rank),
                                        self.name)
            self.consistency = make_consistency(self.topology.mode, self.topology.num_workers, self.topology.staleness)
            if self.config.job.checkpoint_dir:
                self.checkpoints = Checkpoints(self.config.job.checkpoint_dir, self.topology.rank, self.topology.mode,
                                               rendezvous.report_saved, self.metrics.checkpoint.observe)
            log.info("%s serving at %s (%s)", self.name, address, self.topology.mode)
            # torch builds its first optimizer slowly (it imports its compiler then): do that now, beside the
            # loop, not when the first INIT is waiting for it
            threading.Thread(target=_warm_up, name="zps-warm-up", daemon=True).start()
            try:
                self._serve(sock, rendezvous)
            except Exception as exc:  # a bug in the loop: the job fails naming it, never takes this for an end
                log.exception("%s: its loop failed", self.name)
                failure = f"{self.name}: internal error: {type(exc).__name__}: {exc}"
                return 1
            if rendezvous.failure:
                log.error("%s: %s", self.name, rendezvous.failure)
                return 1
            return 0
        finally:
            if self.checkpoints is not None:
                self.checkpoints.wait(self.config.job.timeout)  # a checkpoint being written is not thrown away
            if self.out.enabled:
                self._record("end")
            rendezvous.done(failure)
            rendezvous.close()
            sock.close(linger=0)
            self.replication.close()
            if metrics_server is not None:
                metrics_server.close()
            self._write_trace()

    def _trim(self) -> None:
        self._since_trim = 0
        release_free_memory()

    def _serve(self, sock: zmq.Socket, rendezvous: RendezvousClient) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        for peer in self.replication.sockets.values():  # --replicas: the backups' acknowledgements
            poller.register(peer, zmq.POLLIN)
        while not self.stop.is_set() and not rendezvous.shutdown_requested.is_set():
            wait_ms = 100
            soonest = self.pending.soonest()
            if soonest is not None:
                wait_ms = max(0, min(wait_ms, int((soonest - time.monotonic()) * 1000) + 1))
            if poller.poll(wait_ms):
                # drain what is queued before checking deadlines again
                for _ in range(256):
                    if not transport.readable(sock):
                        break
                    try:
                        frames = transport.recv_bounded(sock, transport.MAX_FRAMES, self.config.job.max_message_bytes)
                    except transport.TooLarge as exc:
                        self.counters["errors"] += 1
                        self._send(exc.identity, error_reply(0, self.name, ErrorCode.TOO_LARGE, str(exc)))
                        continue
                    received = sum(len(f) for f in frames[2:])
                    self.counters["bytes_in"] += received
                    self.metrics.wire[("in", "tcp")] += received + len(frames[1])
                    self._handle(frames)
                    self._since_trim += 1 + received
                    del frames  # the message's buffers are free from here on
                    self._last_request = time.monotonic()
                    if self._since_trim >= _TRIM_BACKSTOP:
                        self._trim()
            elif self._since_trim and time.monotonic() - self._last_request >= _TRIM_WHEN_IDLE:
                self._trim()
            if self.replication.sockets:
                acknowledged = self.replication.receive()
                if self.replication.reseed:
                    self._send_seeds()
                if acknowledged:
                    self.pending.flush(acknowledged)
                if self.replication.fenced is not None:
                    rendezvous.failure = f"{self.name}: {self.replication.fenced}; it stops serving"
                    break
                rendezvous.report_replicated(self.replication.replicated)
            self._drain_notices()
            if len(self.pending):
                self.pending.expire(self.config.job.timeout)
            if time.monotonic() >= self._measured:
                self._measure()
            if self.out.enabled and time.monotonic() >= self._record_at:
                self._record("server")
            if self._kill_at is not None:
                self._maybe_kill()
        self.pending.fail_all(rendezvous.failure or "the job is shutting down")

    # -- dispatch --------------------------------------------------------------------------------------
    def _send(self, identity: bytes, msg: Message) -> None:
        """Send a reply; one that cannot be built or sent is logged and dropped, never the end of the loop."""
        assert self._sock is not None
        try:
            frames = msg.to_frames()
        except Exception as exc:  # e.g. a value msgpack cannot pack; the peer's request then times out, naming us
            self.counters["errors"] += 1
            log.error("%s: a reply (%s) could not be built: %s: %s", self.name, msg.describe(), type(exc).__name__,
                      exc)
            return
        # counted before the send: a peer that got the reply reads counters that include it
        self.counters["bytes_out"] += transport.size_of(frames[1:])
        self.metrics.wire[("out", "tcp")] += transport.size_of(frames)
        if msg.kind is Kind.ERROR:
            self.metrics.errors[str(msg.body.get("code", "internal"))] += 1
        started = self._started.pop((identity, msg.id), None)
        if started is not None:
            self.metrics.observe_latency(started[0], time.monotonic() - started[1])
        try:
            transport.send_frames(self._sock, frames, identity)
        except zmq.ZMQError as exc:
            self.counters["errors"] += 1
            log.error("%s: a reply (%s) could not be sent: %s", self.name, msg.describe(), exc)

    def _arrived(self, identity: bytes, msg: Message) -> None:
        """Count a parsed request and note when it came (its reply observes the latency)."""
        kind = msg.kind.value
        self.metrics.requests[kind] += 1
        if len(self._started) >= 4 * self.config.job.max_pending + 1024:  # replies that never came: forget them
            self._started.pop(next(iter(self._started)))
        self._started[(identity, msg.id)] = (kind, time.monotonic())

    # -- what the server reports -----------------------------------------------------------------------
    def _measure(self) -> None:
        """Measure what is costly to count (the optimizer state's bytes), in the loop, once per heartbeat."""
        self._measured = time.monotonic() + self.config.job.heartbeat_interval
        total = 0
        for optimizer in list(self.optimizers.by_group.values()):
            for state in optimizer.state.values():
                total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        self._optimizer_bytes = total

    def _maybe_kill(self) -> None:
        """--kill server:R@S: SIGKILL as the applied step reaches S (a server that starts past it, resumed from a
        checkpoint, is not killed again)."""
        now = self._step()
        if self._kill_seen is not None and self._kill_seen < self._kill_at <= now:  # type: ignore[operator]
            log.warning("%s: killed at step %d (--kill)", self.name, now)
            self._kill_at = None
            self.kill()
        self._kill_seen = now

    def _step(self) -> int:
        """The newest step applied: BSP's version of its keys; ASP/SSP's furthest worker clock."""
        if self.consistency is None:
            return 0
        if self.consistency.name == "bsp":
            return max((s.version for s in self.keys.values()), default=0)
        return max(self.consistency.clock.values(), default=0)

    def _totals(self) -> dict[str, float]:
        wire = self.metrics.wire
        return {**self.timing, "requests": self.counters["requests"], "updates": self.metrics.counts["updates"],
                "recv": wire[("in", "tcp")] + wire[("in", "shm")], "sent": wire[("out", "tcp")] + wire[("out", "shm")]}

    def _record(self, kind: str) -> None:
        """--metrics-out: a ``server`` record (what changed since the previous one), or the ``end`` (totals)."""
        self._record_at = time.monotonic() + 1.0
        now = self._totals()
        if kind == "end":
            self.out.write("end", step=self._step(), rss=rss_bytes(), cpu=cpu_seconds(), **now)
            self.out.close()
            return
        delta = {k: v - self._recorded.get(k, 0) for k, v in now.items()}
        self._recorded = now
        self.out.write("server", step=self._step(), cpu=cpu_seconds(),
                       **{k: v if k in self.timing else int(v) for k, v in delta.items()})

    def _gauges(self) -> dict[str, float]:
        values: dict[str, float] = {"resident_memory_bytes": rss_bytes(), "parameter_bytes": self._bytes,
                  "optimizer_state_bytes": self._optimizer_bytes, "keys": len(self.keys),
                  "pending_requests": len(self.pending)}
        assert set(values) == {name for name, _ in GAUGES}
        return values

    def _report(self) -> dict[str, Any]:
        """What each heartbeat tells the coordinator (zps.protocol.progress)."""
        wire, logical = self.metrics.wire, self.metrics.tensors
        return {"keys": len(self.keys), "param_bytes": self._bytes, "optimizer_bytes": self._optimizer_bytes,
                "requests": self.counters["requests"], "updates": self.metrics.counts["updates"], "rss": rss_bytes(),
                "cpu": cpu_seconds(),
                "recv": wire[("in", "tcp")] + wire[("in", "shm")], "sent": wire[("out", "tcp")] + wire[("out", "shm")],
                "logical_recv": sum(v[0] for k, v in list(logical.items()) if k[0] == "in"),
                "logical_sent": sum(v[0] for k, v in list(logical.items()) if k[0] == "out")}

    def _write_trace(self) -> None:
        try:
            self.tracer.write()
        except OSError as exc:
            log.error("%s: the trace could not be written: %s", self.name, exc)

    def _drain_notices(self) -> None:
        while self._notices:
            self._notice(self._notices.popleft())

    def _handle(self, frames: list[Any]) -> None:
        """Serve one message; whatever it holds, the loop goes on (an exception becomes an ERROR reply)."""
        self.counters["requests"] += 1
        if self._notices:  # the coordinator's news first (a worker's pid before its INIT)
            self._drain_notices()
        identity = transport.frame_bytes(frames[0])
        request_id = 0
        try:
            msg = parse_frames(frames[1:], header_limit=self.config.job.max_header_bytes)
            request_id = msg.id
            if self.config.secrets is not None:
                security.check_sender(frames[0], msg.src)
            self._arrived(identity, msg)
            reply = self.handle(identity, msg)
        except ProtocolError as exc:
            self.counters["errors"] += 1
            self.complain(identity, str(exc))
            reply = error_reply(request_id, self.name, exc.code, f"{self.name}: {exc.reason}")
        except Exception as exc:  # a bug must not take the server down; the worker hears about it
            self.counters["errors"] += 1
            self.complain(identity, f"internal error: {type(exc).__name__}: {exc}", logging.ERROR, exc_info=True)
            reply = error_reply(request_id, self.name, ErrorCode.INTERNAL, f"{self.name}: {type(exc).__name__}: {exc}")
        if reply is not None:
            self._send(identity, reply)
        changed, self._changed = self._changed, set()
        if changed is None or changed:
            self.pending.flush(changed)

    def handle(self, identity: bytes, msg: Message) -> Message | None:
        """Serve one parsed request; return the reply, or None when it waits in ``pending``."""
        if msg.kind is Kind.INIT:
            return self._init(identity, msg)
        if msg.kind in (Kind.PUSH, Kind.PUSH_PULL):
            worker = self._worker(msg)
            if msg.kind is Kind.PUSH:
                targets = self._push(msg, worker)
                if self.replication.enabled:  # acknowledged once every live copy applied it
                    return self._once_replicated(identity, msg, worker, targets)
                return Message(Kind.OK, id=msg.id, src=self.name)
            pull = self._pull_request(identity, msg, worker, max((e.get("step", 0) for e in msg.keys), default=-1) + 1)
            targets = self._push(msg, worker)  # the pull half was checked first: a refused message changes nothing
            if self.replication.enabled:
                pull.after = targets
            return self._pull(pull)
        if msg.kind is Kind.PULL:
            worker = self._worker(msg)
            step = max((e.get("step", 0) for e in msg.keys), default=0)
            request = self._pull_request(identity, msg, worker, step)
            if self.replication.enabled and self.topology is not None and self.topology.mode == "bsp":
                request.after = [(s, step) for s in request.states]  # BSP: values every copy holds
            return self._pull(request)
        if msg.kind is Kind.REPLICATE:
            return self._replicate(msg)
        if msg.kind is Kind.SEED:
            return self._seed(msg)
        if msg.kind is Kind.LEAVE:
            return self._leave(msg, self._worker(msg))
        if msg.kind is Kind.JOIN:
            return self._join(msg, self._worker(msg))
        if msg.kind is Kind.STATS:
            self._worker(msg)  # the job's workers, nobody else
            return Message(Kind.OK, id=msg.id, src=self.name, body=self.stats())
        raise ProtocolError(ErrorCode.BAD_KIND, f"a server does not serve {msg.kind.value!r} requests")

    def _worker(self, msg: Message) -> int:
        worker = self._workers.get(msg.src)
        if worker is not None:
            return worker
        assert self.topology is not None
        peer = parse_peer(msg.src, "worker")
        ranks = self.config.job.worker_ranks
        if peer is None or peer[1] >= ranks:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"'src' must be worker:N with N < {ranks}, got {msg.src!r}")
        worker = self._workers[msg.src] = peer[1]
        return worker

    def _state(self, entry: KeyEntry, initialized: bool = True) -> KeyState:
        key = entry["key"]
        state = self.keys.get(key)
        if state is None:
            raise ProtocolError(ErrorCode.UNKNOWN_KEY, f"key {key} was never declared (INIT it first)")
        if initialized and not state.initialized:
            raise ProtocolError(ErrorCode.NOT_INITIALIZED, f"{state.label()} has no values yet: rank 0 must INIT it")
        return state

    # -- INIT ------------------------------------------------------------------------------------------
    def _init(self, identity: bytes, msg: Message) -> Message | None:
        """Declare keys (every worker) and set their values and optimizer (rank 0). All-or-nothing. The reply
        comes once every key of the message has its values: a worker never pushes to a key rank 0 has not set."""
        worker = self._worker(msg)
        body = msg.body
        opt_name = body.get("optimizer")
        groups = body.get("groups", [])
        if opt_name is not None:
            optimizer_class(opt_name)
            if not isinstance(groups, list) or not groups:
                raise ProtocolError(ErrorCode.BAD_OPTIMIZER,
                                    "'groups' must be a non-empty list of hyper-parameter maps")
        declared: list[tuple[KeyEntry, KeyState | None]] = []
        values: list[torch.Tensor | None] = []
        seen: set[int] = set()
        job = self.config.job
        new_keys, new_bytes = 0, 0
        for entry, frames in msg.entries():
            key, numel, name = entry["key"], entry.get("numel"), entry.get("name", "")
            if key in seen:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key} appears twice in one INIT")
            seen.add(key)
            if type(numel) is not int or numel < 0:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'numel' must be a non-negative integer")
            chunk_offset = entry.get("offset", 0)
            if type(chunk_offset) is not int or not 0 <= chunk_offset < 1 << 62:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'offset' must be a non-negative integer")
            if numel > job.max_key_elements:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"key {key}: {numel} elements is over the cap of "
                                                         f"{job.max_key_elements} (--max-key-elements)")
            if entry.get("dtype", "float32") not in DTYPES or not isinstance(name, str) or len(name) > 1024:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: bad 'dtype' or 'name'")
            if key not in self.keys:
                new_keys, new_bytes = new_keys + 1, new_bytes + 4 * numel
            if len(self.keys) + new_keys > job.max_keys:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"this server would hold more than {job.max_keys} keys (the "
                                                         "cap: --max-keys)")
            if self._bytes + new_bytes > job.max_server_bytes:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"this server would hold more than {job.max_server_bytes} "
                                                         "bytes of parameters (the cap: --max-server-bytes)")
            group = entry.get("group", 0)
            if type(group) is not int or group < 0:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'group' must be a non-negative integer, "
                                                          f"got {group!r}")
            home = entry.get("home", self.replication.rank)
            if type(home) is not int or not 0 <= home < self.replication.num_servers:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'home' must be a server rank, got "
                                                          f"{str(home)[:40]}")
            existing = self.keys.get(key)
            if existing is not None and (existing.numel, existing.name, existing.group) != (numel, name, group):
                # (what the key was declared as is logged here, not told to whoever asks)
                self.complain(identity, f"worker {worker} declares key {key} as {name[:100]!r} with {numel} elements "
                                        f"in group {group}; it is {existing.label()} in group {existing.group}")
                raise ProtocolError(
                    ErrorCode.CONFLICT,
                    f"worker {worker} declares key {key} differently from how it was declared (name, size or "
                    "optimizer group): do all workers build the same model and optimizer?",
                )
            tensor = None
            if frames:
                if opt_name is None:
                    raise ProtocolError(ErrorCode.BAD_OPTIMIZER, "INIT with values must name the server 'optimizer'")
                if entry.get("codec", "none") != "none":
                    raise ProtocolError(ErrorCode.BAD_CODEC, f"key {key}: initial values travel uncompressed")
                if group >= len(groups):
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'group' {group!r} is not one of the "
                                                              f"{len(groups)} groups")
                dtype = dtype_from_name(entry.get("dtype", "float32"))
                decoded = self._decoders.decode(entry, frames, numel, dtype, f"INIT of key {key}")
                tensor = decoded.to(torch.float32, copy=True)
                if group in self.optimizers.by_group:  # joins that optimizer: its hyper-parameters must still be sane
                    clean_hparams(optimizer_class(opt_name), groups[group])
                else:  # refuse now what torch would refuse when building it
                    build_optimizer(opt_name, groups[group], torch.zeros(1, requires_grad=True))
            declared.append((entry, existing))
            values.append(tensor)
        restored = self._restored(opt_name, declared, values) if self.config.job.resume else {}
        segment, shm_reply = self.segments.attach(worker, body.get("shm"), msg.keys)
        # every check passed: now change state
        if segment is not None:
            self.segments.adopt(worker, segment, msg.keys)
        if opt_name is not None:
            self._optimizer = (opt_name, groups)
            if self.checkpoints is not None:
                self.checkpoints.optimizer = (opt_name, groups)
        states = []
        for (entry, existing), tensor in zip(declared, values, strict=True):
            state = existing or KeyState(key=entry["key"], numel=entry["numel"], name=entry.get("name", ""),
                                         offset=entry.get("offset", 0), group=entry.get("group", 0),
                                         home=entry.get("home", self.replication.rank))
            if state.key not in self.keys:
                self._bytes += 4 * state.numel
            self.keys[state.key] = state
            states.append(state)
            if tensor is not None and not state.initialized:
                assert isinstance(opt_name, str)  # checked with the values above
                build = functools.partial(build_optimizer, opt_name, groups[state.group])
                found = restored.get(state.key)
                if found is None:
                    self.optimizers.add(state, tensor, build)
                else:  # the checkpoint's values, optimizer state and bookkeeping, not rank 0's fresh model
                    value, optimizer_state, saved = found
                    self.optimizers.add(state, value, build)
                    self.optimizers.by_group[state.group].state[value] = optimizer_state
                    state.version, state.lr = int(saved["version"]), saved["lr"]
                    state.last_step = dict(saved.get("last_step", {}))
                if self._changed is not None:
                    self._changed.add(state.key)  # declares waiting for its values may go on

        def reply() -> Message:  # with the step the worker is at: 0, or a replacement's or a resumed job's
            assert self.consistency is not None
            at = (min((s.version for s in states), default=0) if self.consistency.name == "bsp"
                  else self.consistency.clock.get(worker, 0))
            return Message(Kind.OK, id=msg.id, src=self.name, body={**shm_reply, "step": at})

        if all(s.initialized for s in states):
            return reply()
        self.pending.add(Waiting(
            identity, msg.id, worker, states, time.monotonic() + self.config.job.timeout,
            ready=lambda: all(s.initialized for s in states), answer=reply,
            why=lambda: self._uninitialized(states), what=f"declare of worker {worker}"))
        return None

    def _restored(self, opt_name: Any, declared: list[tuple[KeyEntry, KeyState | None]],
                  values: list[torch.Tensor | None]) -> dict[int, tuple[torch.Tensor, dict[str, torch.Tensor],
                                                                   dict[str, Any]]]:
        """Resuming: the checkpoint's state of each key rank 0 sets now (read before anything changes; a checkpoint
        that does not fit is refused naming its file and what differs)."""
        if opt_name is None:
            return {}
        try:
            if self._restore is None:
                self._restore = Restore(ckpt.resolve(self.config.job.resume))
                assert self.consistency is not None
                for w, clock in self._restore.clocks.items():
                    self.consistency.note_clock(w, clock)
            restore = self._restore
            restore.check_optimizer(opt_name)
            return {entry["key"]: restore.load(entry.get("name", ""), entry.get("offset", 0), entry["numel"])
                    for (entry, existing), value in zip(declared, values, strict=True)
                    if value is not None and (existing is None or not existing.initialized)}
        except ckpt.CheckpointError as exc:
            raise ProtocolError(ErrorCode.CONFLICT, str(exc)) from None

    @staticmethod
    def _uninitialized(states: list[KeyState]) -> str:
        missing = [s.label() for s in states if not s.initialized]
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return (f"worker 0 has not sent the initial values of {shown} (is worker 0 running and declaring the same "
                "model?)")

    # -- PUSH ------------------------------------------------------------------------------------------
    def _push(self, msg: Message, worker: int) -> list[tuple[KeyState, int]]:
        """Validate and decode every key first; then apply. A message with one bad key changes nothing. With
        --replicas, returns each key with the version that holds this push's contribution (BSP: once its step is
        applied), for the answer to wait until the backups hold it."""
        assert self.consistency is not None
        body = read_push(msg.body)
        lrs = body.get("lr")
        accepted: list[tuple[KeyState, int, torch.Tensor]] = []
        seen: set[int] = set()
        fused = FusedReader(msg.frames, msg.fused, "push") if msg.fused else None
        started = now_us()
        counted: list[tuple[KeyState, str, int]] = []  # (key, codec, encoded bytes): counted once all is checked
        for entry, frames in msg.entries():
            state = self._state(entry)
            if state.key in seen:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"{state.label()} appears twice in one push")
            seen.add(state.key)
            step = entry.get("step", 0)
            if fused is not None and "fz" in entry:
                if entry.get("shm") or entry.get("codec", "none") != "none":
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"push of {state.label()}: a fused key is uncompressed "
                                                              "float32 and not in shared memory")
                grad = fused.get(entry, state.numel, "push")
                counted.append((state, "none", state.numel * 4))
            elif entry.get("shm"):
                if frames or entry.get("codec", "none") != "none" or entry.get("bufs") != [["float32", state.numel]]:
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"push of {state.label()}: a shared-memory push is "
                                                              "uncompressed float32, without frames")
                grad = self.segments.view(worker, state, PUSH, "push of")
                counted.append((state, "shm", state.numel * 4))
            else:
                began = time.perf_counter()
                grad = self._decoders.decode(entry, frames, state.numel, torch.float32, f"push of {state.label()}")
                self.timing["decode"] += time.perf_counter() - began
                counted.append((state, str(entry.get("codec", "none")), transport.size_of(frames)))
            if self.consistency.check_push(state, worker, step):
                accepted.append((state, step, grad))
            else:
                self.counters["duplicates"] += 1
                self.metrics.counts["duplicates"] += 1
        if self.checkpoints is not None and worker == 0 and "ckpt" in body:
            self.checkpoints.request(body["ckpt"])  # worker 0 asks for a checkpoint at step ``hint``
        for state, codec, encoded in counted:
            if codec == "shm":
                self.counters["shm_bytes_in"] += encoded
                self.metrics.wire[("in", "shm")] += encoded
                codec = "none"
            self.metrics.tensor("in", state.name, codec, state.numel * 4, encoded)
        bsp = self.consistency.name == "bsp"
        if not bsp and self.consistency.clock:
            self.metrics.staleness.observe(max(self.consistency.clock.values()) - self.consistency.clock.get(worker, 0))
        updates = []
        now = time.monotonic()
        for state, step, grad in accepted:
            if lrs is not None:
                state.lr = lrs[state.group] if state.group < len(lrs) else lrs[0]
            ready = self.consistency.push(state, worker, step, grad)
            if ready is not None:
                updates.append((state, ready))
                first = self._first_push.pop(state.key, None) if bsp else None
                if first is not None:
                    self.metrics.bsp_wait.observe(now - first)
            elif bsp:
                self._first_push.setdefault(state.key, now)
        replicated = self.replication.enabled
        self._apply(updates, {s.key: (worker, step) for s, step, _ in accepted} if replicated and not bsp else None)
        for state, step, _ in accepted:
            self.consistency.applied(state, worker, step)
        if accepted:
            self.tracer.span("push", started, worker=worker, step=accepted[0][1], keys=len(accepted))
        if not replicated:
            return []
        return [(self.keys[e["key"]], e.get("step", 0) + 1 if bsp else self.keys[e["key"]].version) for e in msg.keys]

    def _apply(self, updates: list[tuple[KeyState, torch.Tensor]],
               origin: dict[int, tuple[int, int]] | None = None) -> None:
        """Apply ``updates`` with the optimizers; a primary first forwards them to the keys' backups (``origin``:
        key -> (worker, step) of the push each came from, ASP/SSP)."""
        assert self.consistency is not None
        if not updates:
            return
        started, start_us = time.perf_counter(), now_us()
        forward = self.replication.snapshot(updates)
        if forward is not None:  # sent first: the backups apply it while this server does
            self.replication.forward(forward, origin)
        self.optimizers.apply(updates)
        took = time.perf_counter() - started
        self.metrics.apply.observe(took)
        self.timing["apply"] += took
        self.metrics.counts["updates"] += len(updates)
        self.tracer.span("apply", start_us, version=updates[0][0].version, keys=len(updates))
        if self._changed is not None:
            self._changed.update(s.key for s, _ in updates)
        self.counters["pushes_applied"] += len(updates)
        if self.checkpoints is not None:
            self.checkpoints.after_apply([s for s, _ in updates], self.keys, self.optimizers, self.consistency.clock)

    # -- PULL ------------------------------------------------------------------------------------------
    def _pull_request(self, identity: bytes, msg: Message, worker: int, step: int) -> PullRequest:
        """Check a pull (known keys, usable pull codec, shared areas) without changing anything."""
        states = [self._state(e, initialized=False) for e in msg.keys]
        pull_codecs: list[str | None] = []
        pull_shm = []
        for entry, state in zip(msg.keys, states, strict=True):
            spec, shared = entry.get("pc"), bool(entry.get("pshm"))
            canonical = None
            if spec is not None:
                codec = self._decoders.get(spec, f"pull codec of {state.label()}")
                problem = codec.feedback_problem()
                if problem:
                    raise ProtocolError(ErrorCode.BAD_CODEC, f"pull codec of {state.label()}: a pull keeps the "
                                                             f"server's error feedback, and {problem}")
                canonical = codec.spec()
            pull_codecs.append(canonical)
            if shared:
                self.segments.view(worker, state, PULL, "pull of")
            pull_shm.append(shared)
        return PullRequest(identity, msg.id, worker, states, step, pull_codecs, pull_shm)

    def _pull(self, p: PullRequest) -> Message | None:
        """Answer now if the consistency mode allows, else wait in ``pending`` (with a deadline)."""
        assert self.consistency is not None
        slowest = self.consistency.slowest()
        self.consistency.note_clock(p.worker, p.step)
        if self.consistency.slowest() != slowest:
            self._changed = None  # SSP pulls of every worker may go on now
        if self._ready(p):
            return self._answer(p)
        self.pending.add(Waiting(p.identity, p.request_id, p.worker, p.states,
                                 time.monotonic() + self.config.job.timeout, ready=lambda: self._ready(p),
                                 answer=lambda: self._answer(p), why=lambda: self._blocked(p), what="pull"))
        return None

    def _ready(self, p: PullRequest) -> bool:
        assert self.consistency is not None
        return (all(self.consistency.pull_ready(s, p.worker, p.step) for s in p.states)
                and self._replicated(p.after))

    def _replicated(self, targets: list[tuple[KeyState, int]]) -> bool:
        """Every live backup holds each (key, version) of ``targets``."""
        return all(self.replication.acked(s) >= version for s, version in targets)

    def _answer(self, p: PullRequest) -> Message:
        assert self.consistency is not None
        self.consistency.served(p.worker, p.step)
        with self.tracer("pull", worker=p.worker, step=p.step, keys=len(p.states)):
            began = time.perf_counter()
            reply = self.values.reply(p, self.checkpoints.latest if self.checkpoints is not None else 0)
            self.timing["encode"] += time.perf_counter() - began
            return reply

    def _blocked(self, p: PullRequest) -> str:
        assert self.consistency is not None
        blocked = next((s for s in p.states if not self.consistency.pull_ready(s, p.worker, p.step)), None)
        if blocked is None:
            return self._unreplicated(p.after)
        return self.consistency.pull_waiting_for(blocked, p.worker, p.step)

    def _unreplicated(self, targets: list[tuple[KeyState, int]]) -> str:
        state, version = next(((s, v) for s, v in targets if self.replication.acked(s) < v), targets[0])
        return (f"{state.label()} at version {state.version}: its backups (servers "
                f"{self.replication.backups(state)}) have acknowledged version {self.replication.acked(state)}, "
                f"the request waits for {version}")

    # -- replication (--replicas) -------------------------------------------------------------------------
    def _once_replicated(self, identity: bytes, msg: Message, worker: int,
                         targets: list[tuple[KeyState, int]]) -> Message | None:
        """A push's OK, once every live backup holds what it contributed to (BSP: the step's update)."""
        reply = Message(Kind.OK, id=msg.id, src=self.name)
        if self._replicated(targets):
            return reply
        self.pending.add(Waiting(identity, msg.id, worker, [s for s, _ in targets],
                                 time.monotonic() + self.config.job.timeout, ready=lambda: self._replicated(targets),
                                 answer=lambda: reply, why=lambda: self._unreplicated(targets), what="push"))
        return None

    def _replicate(self, msg: Message) -> Message:
        """A backup: apply a primary's updates as it did (all checked first; one already held is acknowledged and
        skipped, so a retried or late one is applied once)."""
        assert self.topology is not None
        if not self.replication.enabled:
            raise ProtocolError(ErrorCode.BAD_KIND, "this job has no --replicas: a server takes no replicate requests")
        updates = read_replicate(msg, self.topology.num_servers, self.config.job.worker_ranks, self._state,
                                 self._decoders.decode)
        self._refuse_dead(msg)
        fresh = [u for u in updates if not u.held()]
        self.replication.counters["replica_duplicates"] += len(updates) - len(fresh)
        for u in fresh:
            u.state.lr = u.lr
        # (a late forward of a dead primary, reaching the server that took its place, goes on to its backups)
        self._apply([(u.state, u.grad) for u in fresh],
                    {u.state.key: (u.worker, u.step) for u in fresh if u.worker is not None} or None)
        for u in fresh:
            if u.worker is not None:
                u.state.last_step[u.worker] = u.step
        self.replication.counters["replica_applied"] += len(fresh)
        return Message(Kind.OK, id=msg.id, src=self.name)

    def _refuse_dead(self, msg: Message) -> None:
        """A server this one knows dead is fenced off: its updates and seeds are refused (it may be paused, not
        gone; the copies that took its place serve its chunks now)."""
        sender = parse_peer(msg.src, "server")
        if sender is not None and self.replication.is_dead(sender[1]):
            raise ProtocolError(ErrorCode.DEAD, f"{msg.src} was failed over (topology version "
                                                f"{self.replication.version}): it serves nothing any more")

    def _seed(self, msg: Message) -> Message:
        """A backup: take a primary's whole state of some keys (all checked first), declaring those new here."""
        assert self.topology is not None
        if not self.replication.enabled:
            raise ProtocolError(ErrorCode.BAD_KIND, "this job has no --replicas: a server takes no seeds")
        job = self.config.job

        def check_optimizer(name: str, groups: list[Any], group: int) -> None:
            if group in self.optimizers.by_group:
                clean_hparams(optimizer_class(name), groups[group])
            else:
                build_optimizer(name, groups[group], torch.zeros(1, requires_grad=True))

        seed = read_seed(msg, self.topology.num_servers, job.worker_ranks, job.max_key_elements, check_optimizer,
                         self._decoders.decode)
        # the servers the seed's topology names dead are refused from now on, even if the coordinator's notice is
        # still on its way (a late update of a dead primary must not reach this copy after the seed)
        self.replication.fence(seed.topology)
        self._refuse_dead(msg)
        new_keys, new_bytes = 0, 0
        for item in seed.keys:
            entry = item.entry
            existing = self.keys.get(entry["key"])
            if existing is None:
                new_keys, new_bytes = new_keys + 1, new_bytes + 4 * entry["numel"]
            elif (existing.numel, existing.name, existing.group, existing.offset) != (
                    entry["numel"], entry.get("name", ""), entry.get("group", 0), entry.get("offset", 0)):
                raise ProtocolError(ErrorCode.CONFLICT, f"seed of {existing.label()}: it is declared here with "
                                                        "another name, size, offset or group")
        if len(self.keys) + new_keys > job.max_keys or self._bytes + new_bytes > job.max_server_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"with the seed's {new_keys} new keys this server would hold "
                                                     f"more than --max-keys {job.max_keys} keys or --max-server-bytes "
                                                     f"{job.max_server_bytes} bytes")
        # every check passed: now change state
        for item in seed.keys:
            entry = item.entry
            state = self.keys.get(entry["key"])
            if state is None:
                state = self.keys[entry["key"]] = KeyState(
                    key=entry["key"], numel=entry["numel"], name=entry.get("name", ""),
                    offset=entry.get("offset", 0), group=entry.get("group", 0), home=entry.get("home", 0))
                self._bytes += 4 * state.numel
            if state.param is None:
                build = functools.partial(build_optimizer, seed.optimizer, seed.groups[state.group])
                self.optimizers.add(state, item.values.clone(), build)
            else:
                state.param.copy_(item.values)
            assert state.param is not None
            self.optimizers.by_group[state.group].state[state.param] = item.state
            state.version, state.lr, state.last_step = item.version, item.lr, dict(item.last_step)
            if self._changed is not None:
                self._changed.add(state.key)  # declares waiting for its values may go on
        if self._optimizer is None:
            self._optimizer = (seed.optimizer, seed.groups)
        self.replication.counters["seeds_taken"] += len(seed.keys)
        log.warning("FAILOVER: %s: seeded by server %d with %d keys (%s)", self.name, seed.sender, len(seed.keys),
                    keys_text([i.entry["key"] for i in seed.keys]))
        return Message(Kind.OK, id=msg.id, src=self.name)

    def _send_seeds(self) -> None:
        """--replicas: seed the backups the replication state asks for (after a failover, or a refused update)."""
        self.replication.seed(self.keys, self._optimizer_state, self._optimizer, self.config.job.max_message_bytes)

    def _optimizer_state(self, state: KeyState) -> dict[str, torch.Tensor]:
        assert state.param is not None
        return self.optimizers.by_group[state.group].state.get(state.param, {})

    # -- JOIN ------------------------------------------------------------------------------------------
    def _join(self, msg: Message, worker: int) -> Message:
        """A worker beyond --workers (--max-workers) asks to be counted from a step: the step it is counted from."""
        assert self.consistency is not None and self.topology is not None
        step = read_join(msg.body)["step"]
        if worker < self.topology.num_workers:
            raise ProtocolError(ErrorCode.CONFLICT, f"worker {worker} is a member of the job already: only a worker "
                                                    "beyond --workers joins")
        earlier = self.consistency.since.get(worker)
        if earlier is not None and step < earlier:
            raise ProtocolError(ErrorCode.CONFLICT, f"worker {worker} counts from step {earlier} already: a join "
                                                    f"moves only later, not to {step}")
        start, updates = self.consistency.join(worker, step, self.keys.values())
        self._apply(updates)
        self._changed = None
        if earlier != start:
            log.warning("%s: worker %d joins the running job; from step %d the updates average workers %s",
                        self.name, worker, start, sorted(self.consistency.live))
        return Message(Kind.OK, id=msg.id, src=self.name, body={"step": start})

    # -- LEAVE -----------------------------------------------------------------------------------------
    def _leave(self, msg: Message, worker: int) -> Message:
        """A worker finished cleanly: stop waiting for it; apply what its leaving completes."""
        assert self.consistency is not None
        self._apply(self.consistency.leave(worker, self.keys.values()))
        self._changed = None
        self.values.forget(worker)
        self.segments.forget(worker)
        return Message(Kind.OK, id=msg.id, src=self.name)

    def _notice(self, body: dict[str, Any]) -> None:
        """The coordinator's news of a worker: ``gone`` (it failed; --on-worker-failure shrink goes on without it)
        or ``replaced`` (a new process took its rank: what the old one held here is forgotten)."""
        assert self.consistency is not None
        if "failover" in body:
            self._failover(body)
            return
        notice = read_notice(body)
        gone = notice.get("gone")
        for worker in (gone, notice.get("replaced")):
            if worker is not None:
                self.values.forget(worker)
                self.segments.forget(worker)
        self.segments.pids.update({int(w): p for w, p in notice.get("workers", {}).items()})
        if gone is not None and gone in self.consistency.live:
            step = min((s.version for s in self.keys.values()), default=0)
            self._apply(self.consistency.leave(gone, self.keys.values()))
            log.warning("%s: worker %d failed (%s); from step %d the updates average workers %s", self.name, gone,
                        notice.get("why", "no reason given"), step, sorted(self.consistency.live))
        self.pending.flush(None)

    def _failover(self, body: dict[str, Any]) -> None:
        """--replicas: servers died; this one may now serve some of their chunks (their first live copy)."""
        try:
            found = replicas.parse_notice(body, self.replication.num_servers)
        except ValueError as exc:
            log.error("%s: a malformed failover notice from the coordinator: %s", self.name, exc)
            return
        if found is None:
            return
        if self.replication.rank in found[1]:
            self.replication.fenced = f"the coordinator failed this server over (topology version {found[0]})"
            return
        promoted = self.replication.failover(found[0], found[1], self.keys.values())
        if promoted is None:
            return
        if promoted:
            homes = sorted({s.home for s in promoted})
            log.warning("FAILOVER: %s: topology version %d (dead servers %s): now the primary of %d keys of "
                        "server(s) %s (keys %s), at versions %s", self.name, found[0], sorted(found[1]),
                        len(promoted), homes, keys_text([s.key for s in promoted]),
                        sorted({s.version for s in promoted})[:5])
        else:
            log.warning("FAILOVER: %s: topology version %d (dead servers %s)", self.name, found[0], sorted(found[1]))
        self._send_seeds()  # re-replication: the backups new to the keys this server serves get their state
        self.pending.flush(None)  # what waited for a dead backup's acknowledgement goes on

    def stats(self) -> dict[str, Any]:
        """Counters and the consistency record (a summary of the keys' versions: a reply of fixed size)."""
        assert self.consistency is not None
        versions = [s.version for s in self.keys.values()]
        return {
            "mode": self.consistency.name,
            "keys": len(self.keys),
            "versions": [min(versions, default=0), max(versions, default=0)],
            "live_workers": sorted(self.consistency.live),
            "clocks": {str(w): c for w, c in sorted(self.consistency.clock.items())},
            "max_served_gap": self.consistency.max_served_gap,
            "staleness": self.consistency.staleness,
            **self.counters,
            **self.replication.counters,
        }


def serve(config: Config) -> int:
    """Run one parameter server for ``config`` until the job ends; its exit code."""
    return Server(config).run()
