"""A server's share of the embedding tables: the rows it holds (by :func:`zps.protocol.tables.server_of`), the
TABLE, ROWS_PULL and ROWS_PUSH requests (read whole, then served), each table's consistency and its counters.

Every table has its own clock, separate from the dense keys':

- BSP: a step of a table completes on this server once every live worker pushed it (ids or none); the gradient
  rows of one id are summed in rank order (the same bits whatever order the pushes came in), divided by the
  number of workers, and applied once by the table's row-wise optimizer (:class:`zps.protocol.rowstore.RowStore`);
  a pull of step ``t`` waits until the table applied ``t`` steps.
- ASP (or a table declared ``sync="async"``, whatever the job's mode: the hybrid): each push is applied as it comes;
  pulls are answered at once. SSP: pulls wait for the slowest worker's clock, as the dense keys' do.
- A push of (worker, table, step) is applied once: a retry is acknowledged and not applied again.

``--replicas R``: a server holds a *partition* of each table per home it is a copy of (the rows
:func:`zps.protocol.tables.server_of` gives that home; :func:`zps.protocol.replicas.live_copies`), each with its own
step, pushes and push record. The primary of a home forwards each update it applies to the home's live backups
(:mod:`._table_replicas`), and answers a push (and a BSP pull) only once every live backup acknowledged it, as
dense keys are (:class:`._replicas.Replication`).

A partition waits in :class:`._pending.Pending` under a key of its own (a negative one: no dense key is negative),
so a partition's step re-checks only the requests waiting on it.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from zps.protocol import tables as wire
from zps.protocol.config import JobConfig
from zps.protocol.fields import is_int
from zps.protocol.messages import ErrorCode, KeyEntry, Kind, Message, ProtocolError
from zps.protocol.rowstore import COUNTERS, RowStore
from zps.protocol.tables import TableSpec

from ._pending import Waiting
from ._replicas import Replication
from .consistency import Consistency
from .store import KeyState

log = logging.getLogger("zps.server")

TableDone = tuple[Message | None, Waiting | None, set[int], bool]  # (reply, wait, changed keys, everything): a Done
TABLE_COUNTERS = ("rows_pulled", "rows_pushed", "pull_requests", "push_requests", "duplicate_pushes",
                  "bytes_pulled", "bytes_pushed")


@dataclass
class Contribution:
    """One worker's push of one table's step: its distinct ids, their gradient rows and the learning rate."""

    ids: torch.Tensor
    grads: torch.Tensor
    lr: float | None


@dataclass
class RowUpdate:
    """One optimizer step of a partition, as :meth:`RowStore.apply` takes it (BSP: the step's rank-ordered
    aggregate; ASP/SSP: one push), and the push it came from (``worker``: ASP/SSP; BSP: None)."""

    ids: torch.Tensor
    grads: torch.Tensor
    lr: float | None
    step: int
    sightings: torch.Tensor | None = None
    worker: int | None = None


@dataclass
class Table:
    """One table's partition on this server: the rows of ``home`` (without --replicas: this server's own)."""

    spec: TableSpec
    store: RowStore
    mode: str  # bsp, asp or ssp: the job's, or asp for a table declared async
    handle: KeyState  # what requests on this partition wait on in Pending (its version is the partition's)
    home: int = 0
    pushed: dict[int, Contribution] = field(default_factory=dict)  # BSP: the current step's pushes, by worker
    last_step: dict[int, int] = field(default_factory=dict)  # ASP/SSP: each worker's last push applied
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLE_COUNTERS, 0))

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        """BSP: steps applied; ASP/SSP: pushes applied (kept in the handle, which --replicas' acks compare)."""
        return self.handle.version

    @version.setter
    def version(self, value: int) -> None:
        self.handle.version = value


@dataclass
class TableRequest:
    """Who asks: the peer's identity, the request's id, the worker."""

    identity: bytes
    request_id: int
    worker: int


@dataclass
class Declare(TableRequest):
    spec: TableSpec
    existing: Table | None


@dataclass
class PullEntry:
    table: Table
    ids: torch.Tensor
    codec: str


@dataclass
class RowsPull(TableRequest):
    step: int
    entries: list[PullEntry]


@dataclass
class PushEntry:
    table: Table
    step: int
    ids: torch.Tensor
    grads: torch.Tensor
    lr: float | None
    fresh: bool  # False: a retry of a push applied already (acknowledged, not applied again)
    encoded: int


@dataclass
class RowsPush(TableRequest):
    entries: list[PushEntry]
    checkpoint: int | None  # the pusher heard that this checkpoint was asked for (every table copies its step)


class Tables:
    """The tables of server ``rank`` of ``num_servers`` (``worker(msg)``: the asking worker's rank, checked;
    ``replication``: --replicas' state; ``on_applied(table)``: called after each update, for checkpoints;
    ``on_update(table, update)``: before each update is applied, for its backups)."""

    def __init__(self, name: str, job: JobConfig, consistency: Consistency, rank: int, num_servers: int,
                 worker: Callable[[Message], int], replication: Replication | None = None) -> None:
        self.name, self.job, self.consistency = name, job, consistency
        self.rank, self.num_servers, self.worker = rank, num_servers, worker
        self.replication = replication if replication is not None and replication.enabled else None
        self.parts: dict[tuple[int, int], Table] = {}  # (table key, home) -> the partition
        self.on_applied: Callable[[Table], None] = lambda table: None
        self.on_update: Callable[[Table, RowUpdate], None] = lambda table, update: None
        self.on_checkpoint: Callable[[int], None] = lambda checkpoint: None
        self.restore: Callable[[TableSpec], tuple[dict[str, torch.Tensor], dict[str, Any]] | None] = \
            lambda spec: None
        self.seconds = {"apply": 0.0, "read": 0.0}

    def __iter__(self) -> Iterator[Table]:
        return iter(self.parts.values())

    def __len__(self) -> int:
        return len(self.parts)

    @property
    def by_key(self) -> dict[int, Table]:
        """Each table's partition of this server's own rows, by key."""
        return {key: t for (key, home), t in self.parts.items() if home == self.rank}

    def handles(self) -> list[KeyState]:
        """Every partition's handle (--replicas tracks a partition's copies by it)."""
        return [t.handle for t in self]

    def serves(self, table: Table) -> bool:
        """This server is the primary of ``table``'s home (always, without --replicas)."""
        return self.replication is None or self.replication.serves(table.home)

    def homes(self) -> list[int]:
        """The homes this server holds a copy of: its own, and with --replicas those it is a live backup of."""
        if self.replication is None:
            return [self.rank]
        return [h for h in range(self.num_servers) if self.replication.copy_of(h)]

    def add(self, spec: TableSpec, home: int) -> Table:
        """A new, empty partition of ``spec``'s rows of ``home``."""
        mode = "asp" if spec.sync == "async" else self.consistency.name
        name = f"table {spec.name}" + (f" (rows of server {home})" if self.replication is not None else "")
        table = Table(spec, RowStore(spec), mode, KeyState(key=-1 - len(self.parts), numel=0, name=name, home=home),
                      home)
        self.parts[(spec.key, home)] = table
        return table

    def _ok(self, request_id: int, body: dict[str, Any] | None = None, keys: list[KeyEntry] | None = None,
            frames: list[Any] | None = None) -> Message:
        return Message(Kind.OK, id=request_id, src=self.name, body=body or {}, keys=keys or [], frames=frames or [])

    def _table(self, entry: KeyEntry) -> Table:
        """The partition an entry names: its table's ``key`` and its rows' ``home`` (absent: this server's)."""
        home = entry.get("home", self.rank)
        if not is_int(home, 0, self.num_servers):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"'home' must be a server rank below {self.num_servers}")
        table = self.parts.get((entry["key"], home))
        if table is None:
            if any(key == entry["key"] for key, _ in self.parts):
                raise ProtocolError(ErrorCode.CONFLICT, f"server {self.rank} holds no copy of the rows of server "
                                                        f"{home} of table key {entry['key']}")
            raise ProtocolError(ErrorCode.UNKNOWN_KEY, f"no table has key {entry['key']} here (declare it with TABLE "
                                                       "first)")
        return table

    def find(self, key: int) -> Table | None:
        """Any partition of the table with ``key`` (they share its spec)."""
        return next((t for (k, _), t in self.parts.items() if k == key), None)

    def _max_rows(self, table: Table) -> int:
        return max(1, self.job.max_key_elements // table.spec.dim)

    # -- TABLE ---------------------------------------------------------------------------------------
    def read_declare(self, identity: bytes, msg: Message) -> Declare:
        worker = self.worker(msg)
        spec = wire.read_table(msg.body)
        existing = self.find(spec.key)
        if existing is not None and not existing.spec.same(spec):
            what = "is another table" if existing.name != spec.name else "was declared otherwise"
            raise ProtocolError(ErrorCode.CONFLICT, f"worker {worker} declares table {spec.name!r}, but key "
                                                    f"{spec.key} {what} ({existing.spec.to_body()}): do all workers "
                                                    "build the same tables?")
        if existing is None and len(self.by_key) >= self.job.max_tables:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"worker {worker} declares table {spec.name!r}, but this job "
                                                     f"has {len(self.by_key)} tables already (the cap: "
                                                     "--max-tables)")
        return Declare(identity, msg.id, worker, spec, existing)

    def declare(self, request: Declare) -> TableDone:
        """Declare a table (the first worker's declaration creates a partition per home this server holds a copy
        of; a resumed job's takes its rows from the checkpoint); answered with the step the table is at for this
        worker."""
        spec = request.spec
        if request.existing is None:
            for home in self.homes():
                table = self.add(spec, home)
                restored = self.restore(spec) if home == self.rank else None
                if restored is not None:
                    tensors, meta = restored
                    table.store.load(tensors, meta)
                    table.version = int(meta["version"])
                    table.last_step = {int(w): int(s) for w, s in meta.get("last_step", {}).items()}
                log.info("%s: table %r (dim %d, %s, %s) with %d rows of server %d here", self.name, spec.name,
                         spec.dim, spec.optimizer, table.mode, len(table.store), home)
        step = min(self._start(t, request.worker) for (key, _), t in self.parts.items() if key == spec.key)
        return self._ok(request.request_id, {"step": step}), None, set(), False

    def _start(self, table: Table, worker: int) -> int:
        if table.mode == "bsp":
            return table.version
        last = table.last_step.get(worker)
        return last + 1 if last is not None else self.consistency.clock.get(worker, 0)

    # -- ROWS_PULL -----------------------------------------------------------------------------------
    def _ids(self, entry: KeyEntry, frames: list[Any], table: Table, what: str) -> tuple[torch.Tensor, list[Any]]:
        n = wire.read_count(entry, self._max_rows(table), what)
        if not frames:
            raise ProtocolError(ErrorCode.FRAME_COUNT, f"{what}: no ids frame")
        ids = wire.read_ids(frames[0], n, what)
        if self.num_servers > 1 and n and not bool((wire.server_of(ids, self.num_servers) == table.home).all()):
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: ids that are not rows of server {table.home} (a row "
                                                    "lives on the server zps.protocol.tables.server_of names)")
        return ids, frames[1:]

    def _tables_of(self, msg: Message, verb: str) -> Iterator[tuple[KeyEntry, list[Any], Table, str]]:
        """Each (entry, its frames, its table, how errors name it) of a rows message; each table at most once."""
        seen: set[int] = set()
        for entry, frames in msg.entries():
            table = self._table(entry)
            what = f"{verb} of table {table.name!r}"
            if table.spec.key in seen:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: the table appears twice")
            seen.add(table.spec.key)
            yield entry, frames, table, what

    def read_pull(self, identity: bytes, msg: Message) -> RowsPull:
        worker = self.worker(msg)
        steps = {e.get("step", 0) for e in msg.keys}
        if len(steps) > 1:
            raise ProtocolError(ErrorCode.BAD_HEADER, "a rows pull asks for one step, the same for every table")
        entries: list[PullEntry] = []
        for entry, frames, table, what in self._tables_of(msg, "pull"):
            codec = entry.get("pc", "none")
            if codec not in wire.ROW_CODECS:
                raise ProtocolError(ErrorCode.BAD_CODEC, f"{what}: row codec {str(codec)[:40]!r} is not one of "
                                                         f"{', '.join(wire.ROW_CODECS)}")
            ids, rest = self._ids(entry, frames, table, what)
            if rest:
                raise ProtocolError(ErrorCode.FRAME_COUNT, f"{what}: a pull carries the ids frame only")
            entries.append(PullEntry(table, ids, codec))
        return RowsPull(identity, msg.id, worker, steps.pop() if steps else 0, entries)

    def pull(self, request: RowsPull) -> TableDone:
        """Answer now if every table's mode allows, else wait (with the job's deadline)."""
        c = self.consistency
        slowest = c.slowest()
        if any(e.table.mode == "ssp" for e in request.entries):
            c.note_clock(request.worker, request.step)
        everything = c.slowest() != slowest
        waiting = _Pulling(request.identity, request.request_id, request.worker,
                           [e.table.handle for e in request.entries], time.monotonic() + self.job.timeout,
                           "rows pull", tables=self, request=request)
        if waiting.ready():
            return waiting.answer(), None, set(), everything
        return None, waiting, set(), everything

    def ready(self, table: Table, worker: int, step: int) -> bool:
        if table.mode == "bsp":  # (--replicas: values every live backup holds)
            return table.version >= step and self.held([(table.handle, step)])
        if table.mode == "ssp":
            return self.consistency.slowest() >= step - self.consistency.staleness
        return True

    def answer(self, request: RowsPull) -> Message:
        keys: list[KeyEntry] = []
        frames: list[Any] = []
        began = time.perf_counter()
        for e in request.entries:
            rows = e.table.store.read(e.ids)
            encoded, size = wire.encode_rows(rows, e.codec)
            keys.append({"key": e.table.spec.key, "numel": e.ids.numel(), "version": e.table.version,
                         "codec": e.codec, "nf": len(encoded)})
            frames += encoded
            e.table.counters["rows_pulled"] += e.ids.numel()
            e.table.counters["pull_requests"] += 1
            e.table.counters["bytes_pulled"] += size
        self.seconds["read"] += time.perf_counter() - began
        return self._ok(request.request_id, keys=keys, frames=frames)

    # -- ROWS_PUSH -----------------------------------------------------------------------------------
    def read_push(self, identity: bytes, msg: Message) -> RowsPush:
        worker = self.worker(msg)
        entries: list[PushEntry] = []
        for entry, frames, table, what in self._tables_of(msg, "push"):
            step = entry.get("step", 0)
            ids, rest = self._ids(entry, frames, table, what)
            codec = entry.get("codec", "none")
            grads = wire.decode_rows(rest, codec, ids.numel(), table.spec.dim, what)
            lr = wire.read_lr(entry.get("hp"), what)
            fresh = self._check_step(table, worker, step, what)
            entries.append(PushEntry(table, step, ids, grads, lr["lr"] if lr else None, fresh,
                                     8 * ids.numel() + sum(memoryview(f).nbytes for f in rest)))
        checkpoint = msg.body.get("ckpt")
        return RowsPush(identity, msg.id, worker, entries, checkpoint if is_int(checkpoint, 1) else None)

    def _check_step(self, table: Table, worker: int, step: int, what: str) -> bool:
        """Whether this server takes a push of ``step`` (False: a duplicate); STEP_AHEAD for one that cannot be."""
        if table.mode == "bsp":
            if step < table.version or worker in table.pushed or step < self.consistency.since.get(worker, 0):
                return False
            if step > table.version:
                raise ProtocolError(ErrorCode.STEP_AHEAD, f"{what}: step {step} from worker {worker}, but the table "
                                                          f"aggregates step {table.version} here")
            return True
        last = table.last_step.get(worker, -1)
        if step <= last:
            return False
        if not is_int(step, 0, min(last + 2 + (1 << 20), wire.MAX_TABLE_STEP + 1)):
            raise ProtocolError(ErrorCode.STEP_AHEAD, f"{what}: step {step} from worker {worker}, whose last push was "
                                                      f"{last} (a table's steps end at {wire.MAX_TABLE_STEP})")
        return True

    def push(self, request: RowsPush) -> TableDone:
        """Take a push (BSP: into its step; ASP/SSP: applied); with --replicas answered once every live backup holds
        what it contributed to (BSP: its step's update)."""
        if request.checkpoint is not None:  # first: a table at the checkpoint's step is copied before it moves on
            self.on_checkpoint(request.checkpoint)
        changed: set[int] = set()
        targets: list[tuple[KeyState, int]] = []
        for e in request.entries:
            t = e.table
            t.counters["push_requests"] += 1
            t.counters["bytes_pushed"] += e.encoded
            targets.append((t.handle, e.step + 1 if t.mode == "bsp" else t.version + (1 if e.fresh else 0)))
            if not e.fresh:
                t.counters["duplicate_pushes"] += 1
                continue
            t.counters["rows_pushed"] += e.ids.numel()
            if t.mode == "bsp":
                t.pushed[request.worker] = Contribution(e.ids, e.grads, e.lr)
                if self._complete(t):
                    changed.add(t.handle.key)
            else:
                self.apply(t, RowUpdate(e.ids, e.grads, e.lr, e.step, None, request.worker))
                changed.add(t.handle.key)
        if self.held(targets):
            return self._ok(request.request_id), None, changed, False
        waiting = _Acknowledging(request.identity, request.request_id, request.worker, [s for s, _ in targets],
                                 time.monotonic() + self.job.timeout, "rows push", tables=self, targets=targets)
        return None, waiting, changed, False

    def held(self, targets: list[tuple[KeyState, int]]) -> bool:
        """--replicas: every live backup holds each (partition, version) of ``targets`` (always without)."""
        return self.replication is None or self.replication.holds(targets)

    def _expected(self, table: Table) -> set[int]:
        c = self.consistency
        return {w for w in c.live if c.since.get(w, 0) <= table.version}

    def _complete(self, table: Table) -> bool:
        """BSP: apply the table's step once every expected worker pushed it (True: it was applied)."""
        if not table.pushed or not self._expected(table) <= set(table.pushed):
            return False
        order = sorted(table.pushed)
        parts = [table.pushed[w] for w in order]
        lr = parts[0].lr
        if len(parts) == 1:
            ids, grads, sightings = parts[0].ids, parts[0].grads, None
        else:  # each id's rows summed in rank order, then averaged over the workers (DDP's mean)
            ids, inverse = torch.unique(torch.cat([p.ids for p in parts]), return_inverse=True)
            grads = torch.zeros(ids.numel(), table.spec.dim)
            sightings = torch.zeros(ids.numel(), dtype=torch.int64)
            at = 0
            for p in parts:
                where = inverse[at : at + p.ids.numel()]
                grads.index_add_(0, where, p.grads)
                sightings.index_add_(0, where, torch.ones_like(where))
                at += p.ids.numel()
            grads.div_(len(parts))
        table.pushed.clear()
        self.apply(table, RowUpdate(ids, grads, lr, table.version, sightings))
        return True

    def apply(self, table: Table, update: RowUpdate) -> None:
        """Apply ``update`` to ``table`` (the one place a partition changes but for a seed): its backups get it
        first (``on_update``: a primary forwards it), then the store steps, and an ASP/SSP push is recorded."""
        began = time.perf_counter()
        self.on_update(table, update)
        table.store.apply(update.ids, update.grads, update.lr, update.step, update.sightings)
        table.version += 1
        if update.worker is not None:
            table.last_step[update.worker] = update.step
        self.seconds["apply"] += time.perf_counter() - began
        self.on_applied(table)

    def settle(self) -> set[int]:
        """Workers left or failed: the BSP steps that waited only for them complete. The tables' keys that moved."""
        return {t.handle.key for t in self if t.mode == "bsp" and self._complete(t)}

    # -- what is counted ---------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per table: rows held here, bytes, the counters (STATS) of the partitions this server serves (with
        --replicas, their sum, and ``backup_rows``: the rows of those it holds as a backup)."""
        out: dict[str, Any] = {}
        for t in self:
            if not self.serves(t):
                continue
            record = {"rows": len(t.store), "version": t.version, "mode": t.mode, **t.counters, **t.store.counters,
                      **{f"{k}_bytes": v for k, v in t.store.nbytes().items()}}
            found = out.get(t.name)
            out[t.name] = record if found is None else {
                k: min(v, record[k]) if k == "version" else v if k == "mode" else v + record[k]
                for k, v in found.items()}
        if self.replication is not None:
            for t in self:
                if t.name in out:
                    out[t.name]["backup_rows"] = out[t.name].get("backup_rows", 0) + (
                        0 if self.serves(t) else len(t.store))
        return out

    def bytes(self) -> int:
        return sum(sum(t.store.nbytes().values()) for t in self)


@dataclass(kw_only=True)
class _Acknowledging(Waiting):
    """--replicas: a rows push's OK, once every live backup holds what it contributed to (BSP: its step's update)."""

    tables: Tables
    targets: list[tuple[KeyState, int]]

    def ready(self) -> bool:
        return self.tables.held(self.targets)

    def answer(self) -> Message:
        return self.tables._ok(self.request_id)

    def why(self) -> str:
        assert self.tables.replication is not None
        return "rows push: " + self.tables.replication.missing(self.targets)


@dataclass(kw_only=True)
class _Pulling(Waiting):
    """A rows pull waiting for its tables' steps (BSP) or the slowest clock (SSP)."""

    tables: Tables
    request: RowsPull

    def ready(self) -> bool:
        r = self.request
        return all(self.tables.ready(e.table, r.worker, r.step) for e in r.entries)

    def answer(self) -> Message:
        return self.tables.answer(self.request)

    def why(self) -> str:
        r = self.request
        t = next(e.table for e in r.entries if not self.tables.ready(e.table, r.worker, r.step))
        if t.mode == "ssp":
            return f"rows pull of table {t.name!r}: worker {r.worker} at clock {r.step} waits for the slowest worker"
        if t.version >= r.step and self.tables.replication is not None:
            return f"rows pull of table {t.name!r}: " + self.tables.replication.missing([(t.handle, r.step)])
        missing = sorted(self.tables._expected(t) - set(t.pushed))
        return (f"rows pull of table {t.name!r} wants step {r.step}; the table is at step {t.version} here and waits "
                f"for the pushes of workers {missing}")


class TableCollector(Collector):
    """The tables' counters for Prometheus (registered on the server's registry)."""

    def __init__(self, tables: Tables) -> None:
        self.tables = tables

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        rows = GaugeMetricFamily("zps_server_table_rows", "rows of each embedding table held here", labels=["table"])
        held = GaugeMetricFamily("zps_server_table_bytes", "bytes of each table held here (values, optimizer state, "
                                 "index)", labels=["table", "part"])
        counters = {name: CounterMetricFamily(f"zps_server_table_{name}", f"embedding tables: {name.replace('_', ' ')}",
                                              labels=["table"]) for name in TABLE_COUNTERS + COUNTERS}
        by_name: dict[str, list[Table]] = {}
        for t in list(self.tables):  # (--replicas: a table's partitions summed)
            by_name.setdefault(t.name, []).append(t)
        for name, parts in by_name.items():
            rows.add_metric([name], sum(len(t.store) for t in parts))
            for part in ("values", "state", "index"):
                held.add_metric([name, part], sum(t.store.nbytes()[part] for t in parts))
            for counter in TABLE_COUNTERS + COUNTERS:
                counters[counter].add_metric([name], sum({**t.counters, **t.store.counters}[counter] for t in parts))
        yield rows
        yield held
        yield from counters.values()
