"""Reading requests into typed, checked ones, against the keys this server holds: an INIT into a :class:`Declare`,
a push into a :class:`Push` (every key decoded), a pull into a :class:`PullRequest`, a JOIN into a :class:`Join`,
another server's REPLICATE and SEED (``--replicas``) by :mod:`._replicas` and :mod:`._seeds`. Nothing changes here
(a request with one bad key is refused whole); what a request does is :mod:`.shard`'s.

The bodies are read by :mod:`zps.protocol.bodies`, the per-key fields are :class:`zps.protocol.messages.KeyEntry`'s.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from zps.protocol import bodies, transport
from zps.protocol.config import JobConfig
from zps.protocol.fields import UNBOUNDED, is_int
from zps.protocol.messages import ErrorCode, KeyEntry, Message, ProtocolError
from zps.protocol.peers import parse_peer
from zps.protocol.shm import PULL, PUSH
from zps.protocol.tensors import DTYPES, Decoders, FusedReader, dtype_from_name
from zps.protocol.trace import now_us

from ._keys import Keys
from ._metrics import ServerMetrics
from ._replicas import Replicate, read_replicate
from ._seeds import Seed, read_seed
from ._shm import WorkerSegments
from .consistency import Consistency
from .optim import build_optimizer, check_overrides, clean_hparams, optimizer_class
from .store import KeyState


def group_hp(hps: bodies.Hyperparameters | None, group: int) -> dict[str, Any] | None:
    """A group's hyper-parameters from a message's ``hp`` (its one map for every group when it has one)."""
    if not hps:
        return None
    return (hps[group] if group < len(hps) else hps[0]) or None


@dataclass
class Request:
    """Who asks: the peer's identity on the socket (where a reply that waited goes), the request's id, the worker."""

    identity: bytes
    request_id: int
    worker: int


@dataclass
class Declared:
    """One key of an INIT, checked: its entry, the key as declared here already (None: new) and rank 0's values."""

    entry: KeyEntry
    existing: KeyState | None
    values: torch.Tensor | None


@dataclass
class Declare(Request):
    """An INIT, checked whole: the worker declares ``keys`` (rank 0 with their values and the optimizer)."""

    body: bodies.InitBody
    keys: list[Declared]


@dataclass
class Contribution:
    """One key of a push, checked and decoded. ``grad`` None: the worker had no gradient for the key (``ng``).
    ``fresh``: this server takes it (False: a retried push applied already, acknowledged and not applied again);
    ``codec`` and ``encoded``: how it came and its bytes; ``owned``: the tensor is the server's to keep (not a view
    of the worker's shared area)."""

    state: KeyState
    step: int
    grad: torch.Tensor | None
    codec: str  # the codec spec, or "shm": through the worker's shared push area
    encoded: int
    fresh: bool
    owned: bool = True


@dataclass
class Push(Request):
    """A PUSH (or a PUSH_PULL's push half), checked whole, every key decoded."""

    body: bodies.PushBody
    keys: list[Contribution]
    started: float  # when reading it began (µs, for the trace)


@dataclass
class PullRequest(Request):
    """A checked pull: which keys, at which step, and how each key's values go back."""

    states: list[KeyState]
    step: int
    pull_codecs: list[str | None]  # per key: send the change since this worker's last pull, encoded so (canonical)
    pull_shm: list[bool]  # per key: answer through the worker's shared pull area
    # --replicas: answer only once every live backup holds each of these (key, version): the push it came with
    after: list[tuple[KeyState, int]] = field(default_factory=list)
    commit: bodies.Commit | None = None  # how the held step ``step - 1`` is applied


@dataclass
class Inspect(Request):
    """An INSPECT: the norms (``norm``: the order asked, None: none) and finiteness of ``states``' held ``step``."""

    states: list[KeyState]
    step: int
    norm: float | None


@dataclass
class Join(Request):
    """A JOIN: a worker beyond --workers asks to be counted from ``step``."""

    step: int


class Reader:
    """Reads requests against ``keys`` (``rank`` of ``num_servers``: the default ``home`` of a declared key;
    ``complain(identity, text)``: logs what the asker is not told)."""

    def __init__(self, job: JobConfig, keys: Keys, consistency: Consistency, decoders: Decoders,
                 segments: WorkerSegments, metrics: ServerMetrics, rank: int, num_servers: int,
                 complain: Callable[[bytes, str], None]) -> None:
        self.job, self.keys, self.consistency, self.decoders = job, keys, consistency, decoders
        self.segments, self.metrics, self.rank, self.num_servers = segments, metrics, rank, num_servers
        self.complain = complain
        self._workers: dict[str, int] = {}  # src -> worker rank, once checked

    def worker(self, msg: Message) -> int:
        """The rank of the worker that sent ``msg`` (BAD_HEADER unless it is one of the job's)."""
        worker = self._workers.get(msg.src)
        if worker is not None:
            return worker
        peer = parse_peer(msg.src, "worker")
        ranks = self.job.worker_ranks
        if peer is None or peer[1] >= ranks:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"'src' must be worker:N with N < {ranks}, got {msg.src!r}")
        worker = self._workers[msg.src] = peer[1]
        return worker

    def request(self, identity: bytes, msg: Message) -> Request:
        """A request that carries nothing but who asks (LEAVE, STATS)."""
        return Request(identity, msg.id, self.worker(msg))

    def join(self, identity: bytes, msg: Message) -> Join:
        return Join(identity, msg.id, self.worker(msg), bodies.read_join(msg.body)["step"])

    # -- INIT ------------------------------------------------------------------------------------------
    def declare(self, identity: bytes, msg: Message) -> Declare:
        """Every key of an INIT checked against the caps and against how it is declared here, and rank 0's values
        decoded (with a server optimizer torch would build)."""
        worker = self.worker(msg)
        body = bodies.read_init(msg.body)
        self.keys.check_model(body.get("model"), worker)
        opt_name, groups = body.get("optimizer"), body.get("groups", [])
        if opt_name is not None:
            optimizer_class(opt_name)
        declared: list[Declared] = []
        seen: set[int] = set()
        new_keys, new_bytes = 0, 0
        for entry, frames in msg.entries():
            key, numel, name = entry["key"], entry.get("numel"), entry.get("name", "")
            if key in seen:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key} appears twice in one INIT")
            seen.add(key)
            if not is_int(numel, 0, UNBOUNDED):
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'numel' must be a non-negative integer")
            if not is_int(entry.get("offset", 0)):
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'offset' must be a non-negative integer")
            if numel > self.job.max_key_elements:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"key {key}: {numel} elements is over the cap of "
                                                         f"{self.job.max_key_elements} (--max-key-elements)")
            if entry.get("dtype", "float32") not in DTYPES or not isinstance(name, str) or len(name) > 1024:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: bad 'dtype' or 'name'")
            if key not in self.keys:
                new_keys, new_bytes = new_keys + 1, new_bytes + 4 * numel
            self.keys.check_room(new_keys, new_bytes)
            group = entry.get("group", 0)
            if not is_int(group, 0, UNBOUNDED):
                raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'group' must be a non-negative integer, "
                                                          f"got {group!r}")
            home = entry.get("home", self.rank)
            if not is_int(home, 0, self.num_servers):
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
            values = None
            if frames:
                if opt_name is None:
                    raise ProtocolError(ErrorCode.BAD_OPTIMIZER, "INIT with values must name the server 'optimizer'")
                if entry.get("codec", "none") != "none":
                    raise ProtocolError(ErrorCode.BAD_CODEC, f"key {key}: initial values travel uncompressed")
                if group >= len(groups):
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key}: 'group' {group!r} is not one of the "
                                                              f"{len(groups)} groups")
                dtype = dtype_from_name(entry.get("dtype", "float32"))
                decoded = self.decoders.decode(entry, frames, numel, dtype, f"INIT of key {key}")
                values = decoded.to(torch.float32, copy=True)
                if group in self.keys.optimizers.by_group:  # joins that optimizer: its hyper-parameters must be sane
                    clean_hparams(optimizer_class(opt_name), groups[group])
                else:  # refuse now what torch would refuse when building it
                    build_optimizer(opt_name, groups[group], torch.zeros(1, requires_grad=True))
            declared.append(Declared(entry, existing, values))
        return Declare(identity, msg.id, worker, body, declared)

    # -- PUSH ------------------------------------------------------------------------------------------
    def push(self, identity: bytes, msg: Message) -> Push:
        """Every key of a push checked and decoded, and whether this server takes it (a duplicate is not taken)."""
        started, worker = now_us(), self.worker(msg)
        body = bodies.read_push(msg.body)
        fused = FusedReader(msg.frames, msg.fused, "push") if msg.fused else None
        out: list[Contribution] = []
        seen: set[int] = set()
        for entry, frames in msg.entries():
            state = self.keys.of(entry)
            if state.key in seen:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"{state.label()} appears twice in one push")
            seen.add(state.key)
            step = entry.get("step", 0)
            grad: torch.Tensor | None
            if entry.get("ng"):
                if frames or "fz" in entry or entry.get("shm") or "codec" in entry:
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"push of {state.label()}: a key without a gradient "
                                                              "has no frames and no codec")
                grad, codec, encoded = None, "none", 0
            elif fused is not None and "fz" in entry:
                if entry.get("shm") or entry.get("codec", "none") != "none":
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"push of {state.label()}: a fused key is uncompressed "
                                                              "float32 and not in shared memory")
                grad, codec, encoded = fused.get(entry, state.numel, "push"), "none", state.numel * 4
            elif entry.get("shm"):
                if frames or entry.get("codec", "none") != "none" or entry.get("bufs") != [["float32", state.numel]]:
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"push of {state.label()}: a shared-memory push is "
                                                              "uncompressed float32, without frames")
                grad, codec, encoded = self.segments.view(worker, state, PUSH, "push of"), "shm", state.numel * 4
            else:
                began = time.perf_counter()
                grad = self.decoders.decode(entry, frames, state.numel, torch.float32, f"push of {state.label()}")
                self.metrics.seconds["decode"] += time.perf_counter() - began
                codec, encoded = str(entry.get("codec", "none")), transport.size_of(frames)
            if "hp" in body:
                self.check_hp(state.group, group_hp(body["hp"], state.group))
            fresh = self.consistency.check_push(state, worker, step)
            out.append(Contribution(state, step, grad, codec, encoded, fresh, owned=codec != "shm"))
        return Push(identity, msg.id, worker, body, out, started)

    def check_hp(self, group: int, hp: dict[str, Any] | None) -> None:
        """BAD_OPTIMIZER unless the optimizer of ``group`` takes ``hp`` (names it has, values it would build with)."""
        if hp and self.keys.optimizer is not None and group in self.keys.optimizers.by_group:
            check_overrides(optimizer_class(self.keys.optimizer[0]), self.keys.optimizers.built(group), hp)

    def check_commit(self, commit: bodies.Commit | None) -> None:
        if commit is not None and commit["hp"] is not None:
            for group in self.keys.optimizers.by_group:
                self.check_hp(group, group_hp(commit["hp"], group))

    def push_pull(self, identity: bytes, msg: Message) -> tuple[PullRequest, Push]:
        """A push and the pull of the next step's values: the pull half checked first, then the push."""
        pull = self.pull(identity, msg, max((e.get("step", 0) for e in msg.keys), default=-1) + 1)
        return pull, self.push(identity, msg)

    # -- PULL ------------------------------------------------------------------------------------------
    def pull(self, identity: bytes, msg: Message, step: int | None = None) -> PullRequest:
        """A pull's keys (known here), their pull codecs (usable with the server's error feedback) and shared
        areas, checked; ``step``: the version wanted (a PULL's: its keys' newest step)."""
        worker = self.worker(msg)
        if step is None:
            step = max((e.get("step", 0) for e in msg.keys), default=0)
        states = [self.keys.of(e, initialized=False) for e in msg.keys]
        pull_codecs: list[str | None] = []
        pull_shm = []
        for entry, state in zip(msg.keys, states, strict=True):
            spec, shared = entry.get("pc"), bool(entry.get("pshm"))
            canonical = None
            if spec is not None:
                codec = self.decoders.get(spec, f"pull codec of {state.label()}")
                problem = codec.feedback_problem()
                if problem:
                    raise ProtocolError(ErrorCode.BAD_CODEC, f"pull codec of {state.label()}: a pull keeps the "
                                                             f"server's error feedback, and {problem}")
                canonical = codec.spec()
            pull_codecs.append(canonical)
            if shared:
                self.segments.view(worker, state, PULL, "pull of")
            pull_shm.append(shared)
        commit = bodies.read_pull(msg.body).get("commit")
        self.check_commit(commit)
        return PullRequest(identity, msg.id, worker, states, step, pull_codecs, pull_shm, commit=commit)

    def inspect(self, identity: bytes, msg: Message) -> Inspect:
        """An INSPECT: known keys, one step for all."""
        worker = self.worker(msg)
        if self.consistency.name != "bsp":
            raise ProtocolError(ErrorCode.BAD_KIND, f"an inspect asks about a held BSP step; this job runs "
                                                    f"{self.consistency.name}")
        norm = bodies.read_inspect(msg.body).get("norm")
        states = [self.keys.of(e) for e in msg.keys]
        steps = {e.get("step", 0) for e in msg.keys}
        if len(steps) > 1 or not all(is_int(s) for s in steps):
            raise ProtocolError(ErrorCode.BAD_HEADER, "an inspect asks about one step, the same for every key")
        step = steps.pop() if steps else 0
        for state in states:
            late = state.stats_step == step and norm in state.stats  # committed already: what was inspected then
            if state.version > step and not late:
                raise ProtocolError(ErrorCode.CONFLICT, f"{state.label()} is at version {state.version}: step {step}"
                                                        " was applied, and not inspected before (push it with hold)")
        return Inspect(identity, msg.id, worker, states, step, norm)

    # -- --replicas: another server's ---------------------------------------------------------------------
    def replicate(self, identity: bytes, msg: Message) -> Replicate:
        """A primary's updates, checked whole (:func:`._replicas.read_replicate`)."""
        if not self.job.replicas:
            raise ProtocolError(ErrorCode.BAD_KIND, "this job has no --replicas: a server takes no replicate requests")
        return read_replicate(msg, self.num_servers, self.job.worker_ranks, self.check_hp, self.keys.of,
                              self.decoders.decode)

    def seed(self, identity: bytes, msg: Message) -> Seed:
        """A primary's whole state of some keys, checked whole (:func:`._seeds.read_seed`), with an optimizer torch
        would build."""
        if not self.job.replicas:
            raise ProtocolError(ErrorCode.BAD_KIND, "this job has no --replicas: a server takes no seeds")

        def check_optimizer(name: str, groups: list[Any], group: int) -> None:
            if group in self.keys.optimizers.by_group:
                clean_hparams(optimizer_class(name), groups[group])
            else:
                build_optimizer(name, groups[group], torch.zeros(1, requires_grad=True))

        return read_seed(msg, self.num_servers, self.job.worker_ranks, self.job.max_key_elements, check_optimizer,
                         self.decoders.decode)
