"""The shard service: the keys one server holds and what each request does to them. It knows no socket.

:meth:`Shard.handle` takes a parsed message and returns every reply to send: it looks up the kind's :class:`Route`
(one registration per kind, :attr:`Shard.handlers`), whose reader makes the message a typed request
(:mod:`._requests`, :mod:`zps.protocol.bodies`: checked whole before anything changes) and whose handler serves
it, returning a :class:`Done` (its reply now, or the wait that answers it later, and the keys it changed); then
the waiting requests on those keys are re-checked, in that one place. :mod:`.server`'s loop feeds it messages, the
backups' answers and the coordinator's notices, and sends what it returns.

Collaborators, one job each: :class:`._keys.Keys` (the key table and its optimizers), :class:`._pending.Pending`
(requests that wait), :class:`._members.Members` (workers joining, leaving, failing), :class:`._values.Values`
(VALUES replies), :class:`._replicas.Replication` (``--replicas``), :class:`._checkpoint.Checkpoints`
(``--checkpoint-dir``), :class:`._metrics.ServerMetrics` (what is counted).
"""
from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from zps.protocol import board, replicas
from zps.protocol import checkpoint as ckpt
from zps.protocol.bodies import Commit, KeyStat, inspect_reply, read_notice
from zps.protocol.config import JobConfig
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError
from zps.protocol.rendezvous import Topology
from zps.protocol.tensors import Decoders
from zps.telemetry.complaints import Complaints
from zps.telemetry.trace import Tracer, now_us

from ._checkpoint import Checkpoints, Restore
from ._guard import Guard
from ._keys import Keys
from ._members import Members
from ._metrics import ServerMetrics
from ._pending import Pending, Reply, Waiting
from ._replicas import Replicate, Replication, keys_text
from ._requests import Declare, Inspect, Join, PullRequest, Push, Reader, Request, group_hp
from ._seeds import Seed, SeedKey
from ._shm import WorkerSegments
from ._table_checkpoints import TableCheckpoints, restore
from ._table_replicas import TableReplicas
from ._tables import TableCollector, Tables
from ._values import Values
from .consistency import Completed, make_consistency
from .optim import build_optimizer
from .store import Aggregate, KeyState, Update

log = logging.getLogger("zps.server")

Targets = list[tuple[KeyState, int]]  # --replicas: (key, version) every live backup must hold before an answer


@dataclass
class Done:
    """What a handler did: its ``reply`` now, or the ``wait`` that answers it later; ``changed``: the keys it updated
    or set; ``everything``: it may release any waiting request (a worker left, SSP's slowest clock moved)."""

    reply: Message | None = None
    wait: Waiting | None = None
    changed: Collection[int] = ()
    everything: bool = False


Handler = Callable[[bytes, Message], Done]
R = TypeVar("R")


@dataclass(frozen=True)
class Route(Generic[R]):
    """How the shard serves one kind: ``read`` makes the message a checked request (changing nothing), ``serve``
    does what it asks."""

    read: Callable[[bytes, Message], R]
    serve: Callable[[R], Done]

    def __call__(self, identity: bytes, msg: Message) -> Done:
        return self.serve(self.read(identity, msg))


class Shard:
    """The shard service of server ``name`` (``replication``: its --replicas state, which knows its rank)."""

    def __init__(self, name: str, job: JobConfig, topology: Topology, metrics: ServerMetrics, guard: Guard,
                 replication: Replication, checkpoints: Checkpoints | None = None,
                 tracer: Tracer | None = None) -> None:
        self.name, self.job, self.mode = name, job, topology.mode
        self.metrics, self.guard, self.replication, self.checkpoints = metrics, guard, replication, checkpoints
        self.tracer = tracer or Tracer()
        self.consistency = make_consistency(topology.mode, topology.num_workers, topology.staleness, job.bsp_sum,
                                            job.max_pending)
        self.keys = Keys(job)
        self.decoders = Decoders((job.codec, job.pull_codec))
        self.segments = WorkerSegments()
        self.values = Values(name, self.segments, metrics, snapshot=job.mode != "bsp")
        self.pending = Pending(name, job.max_pending)
        self.members = Members(name, self.consistency, self.values, self.segments, topology.num_workers)
        self.read = Reader(job, self.keys, self.consistency, self.decoders, self.segments, metrics, replication,
                           guard.complain)
        self.optimizer_bytes = 0  # of the torch.optim state, measured now and then (:meth:`measure`)
        self._restore: Restore | None = None  # with --resume, opened at the first INIT that needs it
        self._first_push: dict[int, float] = {}  # BSP: key -> when the first push of its current step came
        self._commits: dict[int, Commit] = {}  # BSP: how held steps are applied, by step (zps.protocol.bodies)
        self._board: Message | None = None  # the newest PUT (zps.protocol.board)
        self._seeded: set[int] = set()  # keys set by seeds that waited for a failover notice, until re-checked
        self._duplicates = Complaints(log, name, what="dropped duplicate pushes")
        self.tables = Tables(name, job, self.consistency, replication.rank, replication.num_servers, self.read.worker,
                             replication)
        self.table_replicas = TableReplicas(name, job, self.tables, replication)
        metrics.registry.register(TableCollector(self.tables))
        self.table_checkpoints: TableCheckpoints | None = None
        if checkpoints is not None:
            self.table_checkpoints = TableCheckpoints(
                job.checkpoint_dir, replication.rank, self.tables, checkpoints, job.timeout,
                lambda: checkpoints.after_apply([], self.keys.states, self.keys.optimizers, self.consistency.clock))
            self.tables.on_checkpoint = self.table_checkpoints.ask
        if job.resume:
            self.tables.restore = functools.partial(restore, job.resume, rank=replication.rank,
                                                    num_servers=replication.num_servers)
        read, tables, table_replicas = self.read, self.tables, self.table_replicas
        self.handlers: dict[Kind, Handler] = {
            Kind.INIT: Route(read.declare, self.init), Kind.PUSH: Route(read.push, self.push),
            Kind.PUSH_PULL: Route(read.push_pull, self.push_pull), Kind.PULL: Route(read.pull, self.pull),
            Kind.JOIN: Route(read.join, self.join), Kind.LEAVE: Route(read.request, self.leave),
            Kind.STATS: Route(read.request, self.stats), Kind.REPLICATE: Route(read.replicate, self.replicate),
            Kind.SEED: Route(read.seed, self.seed), Kind.INSPECT: Route(read.inspect, self.inspect),
            Kind.PUT: Route(self._read_put, self.put), Kind.GET: Route(self._read_get, self.get),
            Kind.TABLE: Route(tables.read_declare, lambda r: Done(*tables.declare(r))),
            Kind.ROWS_PULL: Route(tables.read_pull, lambda r: Done(*tables.pull(r))),
            Kind.ROWS_PUSH: Route(tables.read_push, lambda r: Done(*tables.push(r))),
            Kind.TABLE_REPLICATE: Route(table_replicas.read_replicate, lambda r: Done(*table_replicas.replicate(r))),
            Kind.TABLE_SEED: Route(table_replicas.read_seed, lambda r: Done(*table_replicas.seed(r))),
        }
        metrics.holdings, metrics.step = self.holdings, self.step

    # -- dispatch --------------------------------------------------------------------------------------
    def handle(self, identity: bytes, msg: Message) -> list[Reply]:
        """Serve one parsed request: its reply (unless it waits) and the replies of the waiting requests it
        released. A refused request raises ProtocolError and changes nothing."""
        handler = self.handlers.get(msg.kind)
        if handler is None:
            raise ProtocolError(ErrorCode.BAD_KIND, f"a server does not serve {msg.kind.value!r} requests")
        done = handler(identity, msg)
        replies = [] if done.reply is None else [(identity, done.reply)]
        if done.wait is not None:
            try:
                self.pending.add(done.wait)
            except ProtocolError as exc:  # too many waiting: refused, though what it changed stands
                replies.append((identity, self.guard.refuse(identity, msg.id, exc)))
        return replies + self.recheck(done.changed, done.everything)

    def recheck(self, changed: Collection[int], everything: bool = False) -> list[Reply]:
        """The replies of the waiting requests that ``changed`` keys (or any change) made ready: the one place
        waiting requests are re-checked."""
        if everything:
            return self.pending.flush(None)
        return self.pending.flush(changed) if changed else []

    def _ok(self, request_id: int, body: dict[str, Any] | None = None) -> Message:
        return Message(Kind.OK, id=request_id, src=self.name, body=body or {})

    def _deadline(self) -> float:
        return time.monotonic() + self.job.timeout

    # -- INIT ------------------------------------------------------------------------------------------
    def init(self, request: Declare) -> Done:
        """Declare keys (every worker) and set their values and optimizer (rank 0). All-or-nothing. The reply
        comes once every key of the message has its values: a worker never pushes to a key rank 0 has not set."""
        restored = self._restored(request) if self.job.resume else {}
        entries = [d.entry for d in request.keys]
        segment, shm_reply = self.segments.attach(request.worker, request.body.get("shm"), entries)
        # every check passed: now change state
        if segment is not None:
            self.segments.adopt(request.worker, segment, entries)
        opt_name, groups = request.body.get("optimizer"), request.body.get("groups", [])
        if self.keys.model is None and "model" in request.body:
            self.keys.model = (request.body["model"], request.worker)
        if opt_name is not None:
            self.keys.optimizer = (opt_name, groups)
            if self.checkpoints is not None:
                self.checkpoints.optimizer = (opt_name, groups)
        states, changed = [], []
        for item in request.keys:
            entry = item.entry
            state = item.existing or self.keys.add(KeyState(
                key=entry["key"], numel=entry["numel"], name=entry.get("name", ""), offset=entry.get("offset", 0),
                group=entry.get("group", 0), home=entry.get("home", self.replication.rank)))
            states.append(state)
            if item.values is None or state.initialized:
                continue
            assert opt_name is not None  # (checked with the values)
            build = functools.partial(build_optimizer, opt_name, groups[state.group])
            found = restored.get(state.key)
            if found is None:
                self.keys.optimizers.add(state, item.values, build)
            else:  # the checkpoint's values, optimizer state and bookkeeping, not rank 0's fresh model
                value, optimizer_state, saved = found
                self.keys.optimizers.add(state, value, build)
                self.keys.optimizers.by_group[state.group].state[value] = optimizer_state
                state.version, state.hp = int(saved["version"]), saved["hp"]
                state.last_step = dict(saved.get("last_step", {}))
            changed.append(state.key)  # declares waiting for its values may go on
        waiting = _Declaring(request.identity, request.request_id, request.worker, states, self._deadline(),
                             f"declare of worker {request.worker}", shard=self, shm_reply=shm_reply)
        if waiting.ready():
            return Done(reply=waiting.answer(), changed=changed)
        return Done(wait=waiting, changed=changed)

    def _restored(self, request: Declare) -> dict[int, tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]]:
        """Resuming: the checkpoint's state of each key rank 0 sets now (read before anything changes; a checkpoint
        that does not fit is refused naming its file and what differs)."""
        opt_name = request.body.get("optimizer")
        if opt_name is None:
            return {}
        try:
            if self._restore is None:
                self._restore = Restore(ckpt.resolve(self.job.resume))
                for w, clock in self._restore.clocks.items():
                    self.consistency.note_clock(w, clock)
            restore = self._restore
            restore.check_optimizer(opt_name)
            return {d.entry["key"]: restore.load(d.entry.get("name", ""), d.entry.get("offset", 0), d.entry["numel"])
                    for d in request.keys
                    if d.values is not None and (d.existing is None or not d.existing.initialized)}
        except ckpt.CheckpointError as exc:
            raise ProtocolError(ErrorCode.CONFLICT, str(exc)) from None

    # -- PUSH, PUSH_PULL, PULL ---------------------------------------------------------------------------
    def push(self, push: Push) -> Done:
        """Take a push; with --replicas it is acknowledged once every live copy applied it."""
        targets, changed = self._take(push)
        waiting = _Acknowledging(push.identity, push.request_id, push.worker, [s for s, _ in targets],
                                 self._deadline(), "push", replication=self.replication, targets=targets)
        if waiting.ready():
            return Done(reply=waiting.answer(), changed=changed)
        return Done(wait=waiting, changed=changed)

    def push_pull(self, request: tuple[PullRequest, Push]) -> Done:
        """A push and the pull of the next step's values, in one request."""
        pull, push = request
        pull.after, changed = self._take(push)
        return self._pull(pull, changed)

    def pull(self, request: PullRequest) -> Done:
        if self.replication.enabled and self.mode == "bsp":
            request.after = [(s, request.step) for s in request.states]  # BSP: values every copy holds
        changed = self._commit(request.commit, request.states) if request.commit is not None else set()
        return self._pull(request, changed)

    def _take(self, push: Push) -> tuple[Targets, set[int]]:
        """Apply a read push: count it, add each key it brings fresh to its step (BSP) or apply it (ASP/SSP).
        Returns the keys it updated and, with --replicas, each key with the version that holds this push's
        contribution (BSP: once its step is applied), for the answer to wait until the backups hold it."""
        c, m = self.consistency, self.metrics
        taken = [k for k in push.keys if k.fresh]
        if len(taken) < len(push.keys):  # counted, and logged (once a minute per worker, with the count between)
            dropped = [k for k in push.keys if not k.fresh]
            m.duplicates += len(dropped)
            self._duplicates(push.identity, f"{len(dropped)} keys of worker {push.worker}'s push of step "
                                            f"{dropped[0].step} (keys {keys_text([k.state.key for k in dropped])}) "
                                            "had been applied already: acknowledged, not applied again")
        if self.checkpoints is not None and push.worker == 0 and "ckpt" in push.body:
            self.checkpoints.request(push.body["ckpt"])  # worker 0 asks for a checkpoint at that step
            if self.table_checkpoints is not None:
                self.table_checkpoints.ask(push.body["ckpt"])
        for k in push.keys:
            if k.codec == "shm":
                m.shared("in", k.encoded)
            m.tensor("in", k.state.name, "none" if k.codec == "shm" else k.codec, k.state.numel * 4, k.encoded)
        bsp = c.name == "bsp"
        if not bsp and c.clock:
            m.staleness.observe(max(c.clock.values()) - c.clock.get(push.worker, 0))
        hps, hold = push.body.get("hp"), bool(push.body.get("hold")) and bsp
        updates: list[Update] = []
        held: set[int] = set()
        now = time.monotonic()
        for k in taken:
            state = k.state
            if hold:
                state.hold = True
            ready = c.push(state, push.worker, k.step, k.grad, group_hp(hps, state.group), k.owned)
            if ready is not None:
                if self._completed(state, ready, updates):
                    held.add(state.key)
                first = self._first_push.pop(state.key, None) if bsp else None
                if first is not None:
                    m.bsp_wait.observe(now - first)
            elif bsp:
                self._first_push.setdefault(state.key, now)
        replicated = self.replication.enabled
        changed = self._apply(updates, {k.state.key: (push.worker, k.step) for k in taken}
                              if replicated and not bsp else None) | held
        for k in taken:
            c.applied(k.state, push.worker, k.step)
        if taken:
            self.tracer.span("push", push.started, worker=push.worker, step=taken[0].step, keys=len(taken))
        if not replicated:
            return [], changed
        return [(k.state, k.step + 1 if bsp else k.state.version) for k in push.keys], changed

    def _completed(self, state: KeyState, aggregate: Aggregate, updates: list[Update]) -> bool:
        """A key's step is complete: its update goes into ``updates``, or is held until its commit (True: held --
        the key changed with no update yet, and an INSPECT waiting for its aggregate must be looked at again)."""
        if not aggregate.hold:
            state.hp = aggregate.hp
            updates.append((state, aggregate.grad))
            return False
        if aggregate.grad is not None and aggregate.grad is not state.acc:
            aggregate = aggregate._replace(grad=aggregate.grad.clone())  # (the received buffer itself: one worker)
        state.held, state.stats, state.stats_step = aggregate, {}, state.version
        commit = self._commits.get(state.version)
        if commit is None:
            return True
        updates.extend(self._committed([state], commit))
        return False

    def _committed(self, states: list[KeyState], commit: Commit) -> list[Update]:
        """The updates of held ``states`` as ``commit`` says: skipped (versioned only), or scaled by its factors in
        turn and stepped with its hyper-parameters."""
        out: list[Update] = []
        for state in states:
            held, state.held = state.held, None
            assert held is not None
            grad = None if commit["skip"] else held.grad
            if grad is not None:
                for factor in commit["mul"]:
                    grad.mul_(factor)
            state.hp = group_hp(commit["hp"], state.group)
            out.append((state, grad))
        return out

    def _commit(self, commit: Commit, states: list[KeyState]) -> set[int]:
        """A worker's word on how held step ``commit.step`` is applied (every worker sends the same; the first
        counts). The held keys of this pull are applied now, the others as a pull of theirs comes or as their
        aggregate completes: applying and answering overlap, key by key. The keys updated."""
        step = commit["step"]
        if step not in self._commits:
            self._commits[step] = commit
            for old in [s for s in self._commits if s < step - 2]:
                del self._commits[old]
        held = [s for s in states if s.held is not None and s.version == step]
        return self._apply(self._committed(held, self._commits[step]))

    def _apply_completed(self, done: list[Completed]) -> set[int]:
        updates: list[Update] = []
        held = {state.key for state, aggregate in done if self._completed(state, aggregate, updates)}
        return self._apply(updates) | held

    def _apply(self, updates: list[Update], origin: dict[int, tuple[int, int]] | None = None) -> set[int]:
        """Apply ``updates`` with the optimizers (the one place an update is applied); a primary first forwards them
        to the keys' backups (``origin``: key -> (worker, step) of the push each came from, ASP/SSP). The keys
        updated."""
        if not updates:
            return set()
        started, start_us = time.perf_counter(), now_us()
        forward = self.replication.snapshot(updates)
        if forward is not None:  # sent first: the backups apply it while this server does
            self.replication.forward(forward, origin)
        self.keys.optimizers.apply(updates)
        took = time.perf_counter() - started
        self.metrics.apply.observe(took)
        self.metrics.seconds["apply"] += took
        self.metrics.updates += len(updates)
        self.tracer.span("apply", start_us, version=updates[0][0].version, keys=len(updates))
        if self.checkpoints is not None:
            self.checkpoints.after_apply([s for s, _ in updates], self.keys.states, self.keys.optimizers,
                                         self.consistency.clock)
        return {s.key for s, _ in updates}

    def _pull(self, p: PullRequest, changed: Collection[int]) -> Done:
        """Answer now if the consistency mode allows, else wait (with a deadline)."""
        slowest = self.consistency.slowest()
        self.consistency.note_clock(p.worker, p.step)
        everything = self.consistency.slowest() != slowest  # SSP pulls of every worker may go on now
        waiting = _Pulling(p.identity, p.request_id, p.worker, p.states, self._deadline(), "pull", shard=self,
                           request=p)
        if waiting.ready():
            return Done(reply=waiting.answer(), changed=changed, everything=everything)
        return Done(wait=waiting, changed=changed, everything=everything)

    # -- JOIN, LEAVE, the coordinator's notices ----------------------------------------------------------
    def join(self, request: Join) -> Done:
        """A worker beyond --workers asks to be counted from a step: the step it is counted from."""
        start, done = self.members.join(request.worker, request.step, self.keys.values())
        return Done(reply=self._ok(request.request_id, {"step": start}), changed=self._apply_completed(done),
                    everything=True)

    def leave(self, request: Request) -> Done:
        """A worker finished cleanly: stop waiting for it; apply what its leaving completes."""
        done = self.members.leave(request.worker, self.keys.values())
        changed = self._apply_completed(done) | self.tables.settle()
        return Done(reply=self._ok(request.request_id), changed=changed, everything=True)

    def notice(self, body: dict[str, Any]) -> list[Reply]:
        """The coordinator's news (a NOTICE body): of workers (:class:`._members.Members`) or, --replicas, of dead
        servers (:meth:`failover`). The replies of the waiting requests it released."""
        notice = read_notice(body)
        if "failover" in notice:
            return self.failover(body)
        self._apply_completed(self.members.notice(notice, self.keys.values()))
        self.tables.settle()
        return self.recheck((), everything=True)

    def failover(self, body: dict[str, Any]) -> list[Reply]:
        """--replicas: servers died; this one may now serve some of their chunks (their first live copy)."""
        try:
            found = replicas.parse_notice(body, self.replication.num_servers)
        except ValueError as exc:
            log.error("%s: a malformed failover notice from the coordinator: %s", self.name, exc)
            return []
        if found is None or found[0] <= self.replication.version:  # not one, or one seen already: nothing new
            return []
        if self.replication.rank in found[1]:
            self.replication.fenced = f"the coordinator failed this server over (topology version {found[0]})"
            return []
        promoted = self.replication.failover(found[0], found[1], [*self.keys.values(), *self.tables.handles()])
        if promoted is None:
            return []
        if promoted:
            homes = sorted({s.home for s in promoted})
            log.warning("FAILOVER: %s: topology version %d (dead servers %s): now the primary of %d keys of "
                        "server(s) %s (keys %s), at versions %s", self.name, found[0], sorted(found[1]),
                        len(promoted), homes, keys_text([s.key for s in promoted]),
                        sorted({s.version for s in promoted})[:5])
        else:
            log.warning("FAILOVER: %s: topology version %d (dead servers %s)", self.name, found[0], sorted(found[1]))
        self.send_seeds()  # re-replication: the backups new to the keys this server serves get their state
        # what waited for a dead backup's acknowledgement goes on, and seeds that waited for this notice are taken
        # (then again what waits on the keys they set: a declare of a key new here)
        replies = self.recheck((), everything=True)
        seeded, self._seeded = self._seeded, set()
        return replies + self.recheck(seeded) if seeded else replies

    # -- INSPECT: a held step's norms; PUT and GET: worker 0's tensors for every worker --------------------
    def inspect(self, request: Inspect) -> Done:
        """The norms and finiteness of held aggregates, once every key asked for holds its step's."""
        waiting = _Inspecting(request.identity, request.request_id, request.worker, request.states,
                              self._deadline(), "inspect", shard=self, request=request)
        if waiting.ready():
            return Done(reply=waiting.answer())
        return Done(wait=waiting)

    def _read_put(self, identity: bytes, msg: Message) -> Message:
        self.read.worker(msg)  # the job's workers, nobody else
        board.read_tensors(msg)  # checked whole before it is kept
        return msg

    def put(self, msg: Message) -> Done:
        """Keep worker 0's tensors (the newest PUT only), for every other worker's GET."""
        self._board = msg
        return Done(reply=self._ok(msg.id), everything=True)

    def _read_get(self, identity: bytes, msg: Message) -> tuple[Request, str]:
        return self.read.request(identity, msg), board.read_get(msg)

    def get(self, request: tuple[Request, str]) -> Done:
        """Worker 0's newest PUT, once it has the name asked for."""
        asker, name = request
        waiting = _Getting(asker.identity, asker.request_id, asker.worker, [], self._deadline(),
                           f"broadcast {name!r}", shard=self, name=name)
        if waiting.ready():
            return Done(reply=waiting.answer())
        return Done(wait=waiting)

    # -- --replicas: a backup's side -----------------------------------------------------------------------
    def replicate(self, request: Replicate) -> Done:
        """A backup: apply a primary's updates as it did (all checked first, its sender the keys' primary in the
        coordinator's topology; one already held is acknowledged and skipped, so a retried or late one is applied
        once)."""
        updates = request.updates
        fresh = [u for u in updates if not u.held()]
        self.replication.counters["replica_duplicates"] += len(updates) - len(fresh)
        for u in fresh:
            u.state.hp = u.hp
        # (a late forward of a dead primary, reaching the server that took its place, goes on to its backups)
        changed = self._apply([(u.state, u.grad) for u in fresh],
                              {u.state.key: (u.worker, u.step) for u in fresh if u.worker is not None} or None)
        for u in fresh:
            if u.worker is not None:
                u.state.last_step[u.worker] = u.step
        self.replication.counters["replica_applied"] += len(fresh)
        return Done(reply=self._ok(request.request_id), changed=changed)

    def seed(self, seed: Seed) -> Done:
        """A backup: take a primary's whole state of some keys (all checked first), declaring those new here. A seed
        that follows a failover this server has not heard of yet waits for the coordinator's notice: only the
        topology the coordinator announced says who may seed whom (a server named dead there is refused as DEAD:
        a paused primary is fenced off)."""
        if self.replication.early(seed):
            return Done(wait=_Seeding(seed.identity, seed.request_id, -1 - seed.sender, [], self._deadline(),
                                      f"seed from {seed.src}", shard=self, seed=seed))
        return Done(reply=self._take_seed(seed), changed=[i.entry["key"] for i in seed.keys])  # declares go on

    def _take_seed(self, seed: Seed) -> Message:
        def home(item: SeedKey) -> int:
            existing = self.keys.get(item.entry["key"])
            return existing.home if existing is not None else int(item.entry.get("home", 0))

        self.replication.check_seed(seed, home)
        new_keys, new_bytes = 0, 0
        for item in seed.keys:
            entry = item.entry
            existing = self.keys.get(entry["key"])
            if existing is None:
                new_keys, new_bytes = new_keys + 1, new_bytes + 4 * entry["numel"]
            elif (existing.numel, existing.name, existing.group, existing.offset) != (
                    entry["numel"], entry.get("name", ""), entry.get("group", 0), entry.get("offset", 0)):
                raise ProtocolError(ErrorCode.CONFLICT, f"seed of key {existing.key}: it is declared here with "
                                                        "another name, size, offset or group")
        self.keys.check_room(new_keys, new_bytes, f"with the seed's {new_keys} new keys ")
        # every check passed: now change state
        for item in seed.keys:
            entry = item.entry
            state = self.keys.get(entry["key"]) or self.keys.add(KeyState(
                key=entry["key"], numel=entry["numel"], name=entry.get("name", ""), offset=entry.get("offset", 0),
                group=entry.get("group", 0), home=entry.get("home", 0)))
            if state.param is None:
                build = functools.partial(build_optimizer, seed.optimizer, seed.groups[state.group])
                self.keys.optimizers.add(state, item.values.clone(), build)
            else:
                state.param.copy_(item.values)
            assert state.param is not None
            self.keys.optimizers.by_group[state.group].state[state.param] = item.state
            state.version, state.hp, state.last_step = item.version, item.hp, dict(item.last_step)
            state.before = item.before
        if self.keys.optimizer is None:
            self.keys.optimizer = (seed.optimizer, seed.groups)
        self.replication.counters["seeds_taken"] += len(seed.keys)
        log.warning("FAILOVER: %s: seeded by server %d with %d keys (%s)", self.name, seed.sender, len(seed.keys),
                    keys_text([i.entry["key"] for i in seed.keys]))
        return self._ok(seed.request_id)

    def send_seeds(self) -> None:
        """--replicas: seed the backups the replication state asks for (after a failover, or a refused update): the
        tables' partitions, then the dense keys."""
        self.table_replicas.send_seeds()
        self.replication.seed(self.keys.states, self.keys.optimizer_state, self.keys.optimizer,
                              self.job.max_message_bytes)

    def acknowledged(self, keys: Collection[int]) -> list[Reply]:
        """Backups acknowledged updates of ``keys``: the replies of the requests that waited for that."""
        return self.recheck(keys)

    # -- what the server reports -----------------------------------------------------------------------
    def stats(self, request: Request) -> Done:
        """STATS (the job's workers ask, nobody else): the counters and the consistency record (a summary of the
        keys' versions: a reply of fixed size)."""
        c = self.consistency
        versions = [s.version for s in self.keys.values()]
        return Done(reply=self._ok(request.request_id, {
            "mode": c.name,
            "keys": len(self.keys),
            "versions": [min(versions, default=0), max(versions, default=0)],
            "live_workers": sorted(c.live),
            "clocks": {str(w): clock for w, clock in sorted(c.clock.items())},
            "max_served_gap": c.max_served_gap,
            "staleness": c.staleness,
            **self.metrics.stats(),
            "tables": self.tables.stats(),
        }))

    def checkpoint_for(self, step: int) -> int:
        """The checkpoint a reply to a pull of ``step`` tells its worker of (0: none). BSP: checkpoint V is the cut
        at step V, so only a pull of step V or later hears of it -- a worker that pulls late (its pull is separate
        from its push in a held step) must not hear of worker 0's request for the next checkpoint a step early."""
        latest = self.checkpoints.latest if self.checkpoints is not None else 0
        return latest if self.mode != "bsp" or latest <= step else 0

    def holdings(self) -> dict[str, float]:
        """What this server holds now (the gauges of :mod:`._metrics`)."""
        return {"parameter_bytes": self.keys.bytes + self.tables.bytes(), "optimizer_state_bytes": self.optimizer_bytes,
                "keys": len(self.keys), "pending_requests": len(self.pending)}

    def measure(self) -> None:
        """Measure what is costly to count (the optimizer state's bytes)."""
        self.optimizer_bytes = self.keys.optimizer_bytes()

    def step(self) -> int:
        """The newest step applied: BSP's version of its keys; ASP/SSP's furthest worker clock."""
        if self.consistency.name == "bsp":
            return max((s.version for s in self.keys.values()), default=0)
        return max(self.consistency.clock.values(), default=0)


# -- the ways a request waits ---------------------------------------------------------------------------------
def _key_stat(grad: torch.Tensor | None, norm: float | None) -> KeyStat:
    """A held aggregate's norm and finiteness, in one pass where it can be: a norm is finite only when every
    element is (an inf or NaN makes it inf or NaN), and the largest magnitude serves when no norm is asked for;
    only a non-finite result is checked element by element (finite values whose squares overflow)."""
    if grad is None:
        return KeyStat(None, True)
    value = float(torch.linalg.vector_norm(grad, norm if norm is not None else math.inf))
    finite = math.isfinite(value) or bool(torch.isfinite(grad).all())
    return KeyStat(value if norm is not None else None, finite)


@dataclass(kw_only=True)
class _Inspecting(Waiting):
    """An INSPECT waiting until every key it asks about holds its step's aggregate (or was inspected before its
    commit, for one that comes late)."""

    shard: Shard
    request: Inspect

    def ready(self) -> bool:
        r = self.request
        return all(s.held is not None or (s.stats_step == r.step and r.norm in s.stats) for s in r.states)

    def answer(self) -> Message:
        r = self.request
        stats = {}
        for s in r.states:
            found = s.stats.get(r.norm) if s.stats_step == r.step else None
            if found is None:
                assert s.held is not None
                found = s.stats[r.norm] = _key_stat(s.held.grad, r.norm)
            stats[s.key] = found
        return self.shard._ok(self.request_id, dict(inspect_reply(stats)))

    def why(self) -> str:
        r = self.request
        waiting = next(s for s in r.states if s.held is None)
        return f"inspect of step {r.step}: " + self.shard.consistency.pull_waiting_for(waiting, -1, r.step + 1)


@dataclass(kw_only=True)
class _Seeding(Waiting):
    """--replicas: a seed that follows a failover this server has not heard of yet, until the coordinator's notice
    comes (then it is checked against that topology and taken, or refused)."""

    shard: Shard
    seed: Seed

    def ready(self) -> bool:
        return not self.shard.replication.early(self.seed)

    def answer(self) -> Message:
        reply = self.shard._take_seed(self.seed)
        self.shard._seeded.update(i.entry["key"] for i in self.seed.keys)
        return reply

    def why(self) -> str:
        return (f"it follows topology version {self.seed.topology[0]}, and the coordinator has announced "
                f"{self.shard.replication.version} to this server")


@dataclass(kw_only=True)
class _Getting(Waiting):
    """A GET waiting for worker 0's PUT of its name."""

    shard: Shard
    name: str

    def ready(self) -> bool:
        found = self.shard._board
        return found is not None and found.body.get("name") == self.name

    def answer(self) -> Message:
        assert self.shard._board is not None
        return board.reply(self.request_id, self.shard.name, self.shard._board)

    def why(self) -> str:
        return f"no worker has put {self.name!r} here (is worker 0 at the same call?)"


@dataclass(kw_only=True)
class _Declaring(Waiting):
    """An INIT waiting for rank 0's values of its keys; answered with the step the worker is at (0, or a
    replacement's or a resumed job's)."""

    shard: Shard
    shm_reply: dict[str, Any]

    def ready(self) -> bool:
        return all(s.initialized for s in self.states)

    def answer(self) -> Message:
        c = self.shard.consistency
        at = min((s.version for s in self.states), default=0) if c.name == "bsp" else c.clock.get(self.worker, 0)
        return self.shard._ok(self.request_id, {**self.shm_reply, "step": at})

    def why(self) -> str:
        missing = [s.label() for s in self.states if not s.initialized]
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        return (f"worker 0 has not sent the initial values of {shown} (is worker 0 running and declaring the same "
                "model?)")


@dataclass(kw_only=True)
class _Acknowledging(Waiting):
    """--replicas: a push's OK, once every live backup holds what it contributed to (BSP: the step's update)."""

    replication: Replication
    targets: Targets

    def ready(self) -> bool:
        return self.replication.holds(self.targets)

    def answer(self) -> Message:
        return Message(Kind.OK, id=self.request_id, src=self.replication.name)

    def why(self) -> str:
        return self.replication.missing(self.targets)


@dataclass(kw_only=True)
class _Pulling(Waiting):
    """A pull waiting for its consistency mode (a BSP version, an SSP clock) and, --replicas, for the backups."""

    shard: Shard
    request: PullRequest

    def ready(self) -> bool:
        shard, p = self.shard, self.request
        c = shard.consistency
        return all(c.pull_ready(s, p.worker, p.step) for s in p.states) and shard.replication.holds(p.after)

    def answer(self) -> Message:
        shard, p = self.shard, self.request
        shard.consistency.served(p.worker, p.step)
        with shard.tracer("pull", worker=p.worker, step=p.step, keys=len(p.states)):
            began = time.perf_counter()
            reply = shard.values.reply(p, shard.checkpoint_for(p.step))
            shard.metrics.seconds["encode"] += time.perf_counter() - began
            return reply

    def why(self) -> str:
        shard, p = self.shard, self.request
        c = shard.consistency
        blocked = next((s for s in p.states if not c.pull_ready(s, p.worker, p.step)), None)
        if blocked is None:
            return shard.replication.missing(p.after)
        return c.pull_waiting_for(blocked, p.worker, p.step)
