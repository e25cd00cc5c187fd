"""A server's side of ``--replicas`` for embedding tables: forwarding each update of a partition it serves to that
home's live backups (TABLE_REPLICATE), applying a primary's forwards as a backup, and seeding a backup new to a home
with the whole partition in parts of bounded size (TABLE_SEED), each part checked whole before anything changes and
the partition replaced only once the last part came (the wire: :mod:`zps.protocol.tables`).

Acknowledgements, who holds a copy of which home, re-seeding a backup that refused an update, and fencing are
:class:`._replicas.Replication`'s, as for dense keys: a partition is tracked there by its handle
(:attr:`._tables.Table.handle`, whose version is the partition's). A backup applies a forward with the very call
the primary made (:meth:`._tables.Tables.apply`: ids, gradient rows, learning rate, step, sightings; ASP/SSP the
push's worker, so the push record that keeps a retry from being applied twice is replicated too), so every copy
holds the same bits: rows, optimizer state, admission sketch, the steps rows were last updated at.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from zps.protocol import tables as wire
from zps.protocol.config import JobConfig
from zps.protocol.fields import UNBOUNDED, is_int
from zps.protocol.messages import ErrorCode, KeyEntry, Kind, Message, ProtocolError
from zps.protocol.rowstore import SKETCH_DEPTH, SKETCH_WIDTH, RowStore, state_names
from zps.protocol.tables import TableSeedBody, TableSpec
from zps.protocol.tensors import as_buffer, from_buffer

from ._pending import Waiting
from ._replicas import Replication
from ._seeds import MAX_SEED_BYTES
from ._tables import RowUpdate, Table, TableDone, Tables

log = logging.getLogger("zps.server")

SKETCH_SIZE = SKETCH_DEPTH * SKETCH_WIDTH  # elements of a whole admission sketch
HEADER_ROOM = 1 << 14  # of a seed part's byte budget, kept for its header
MAX_STAGED = 64  # seeds being received at once (a primary sends one partition's parts before the next's)


def _frame(tensor: torch.Tensor) -> Any:
    """A tensor's bytes as a frame (none for an empty one)."""
    return as_buffer(tensor.contiguous().reshape(-1)) if tensor.numel() else b""


def _row_names(spec: TableSpec) -> list[str]:
    """The per-row tensors of a partition's seed, in frame order (:meth:`RowStore.export`'s names)."""
    return ["ids", "values", "touched", *(f"state.{name}" for name in state_names(spec.optimizer))]


@dataclass
class TableReplicate:
    """A TABLE_REPLICATE request, checked: the partition, the update as the primary applied it, and the
    partition's version before it on the primary."""

    request_id: int
    sender: int
    table: Table
    update: RowUpdate
    version: int

    def held(self) -> bool:
        """This copy applied it already (a late or repeated forward): acknowledged, not applied again."""
        if self.update.worker is not None:
            return self.update.step <= self.table.last_step.get(self.update.worker, -1)
        return self.table.version > self.version


@dataclass
class SeedPart:
    """One TABLE_SEED part, checked: who sent it for which topology, the partition's scalars and this part's rows
    (and sketch slice)."""

    identity: bytes
    request_id: int
    src: str
    sender: int
    topology: tuple[int, frozenset[int]]
    body: TableSeedBody
    spec: TableSpec
    home: int
    rows: dict[str, torch.Tensor]
    sketch: torch.Tensor | None

    @property
    def last(self) -> bool:
        return self.body["part"] == self.body["parts"] - 1

    def scalars(self) -> tuple[Any, ...]:
        """What every part of one seed repeats (a part of another seed is refused)."""
        b = self.body
        return (self.sender, self.topology, b["parts"], b["rows"], b["version"], b["steps"], b["clock"],
                tuple(map(tuple, b["last"])))


@dataclass
class _Staged:
    """The parts of a seed received so far (nothing of the partition changes until the last one)."""

    scalars: tuple[Any, ...]
    received: int = 0  # parts
    rows: int = 0
    last_id: int | None = None
    sketch_at: int = 0  # elements of the sketch received
    tensors: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    sketch: list[torch.Tensor] = field(default_factory=list)

    def add(self, part: SeedPart) -> None:
        for name, tensor in part.rows.items():
            self.tensors.setdefault(name, []).append(tensor)
        n = part.rows["ids"].numel()
        self.rows += n
        if n:
            self.last_id = int(part.rows["ids"][-1])
        if part.sketch is not None:
            self.sketch.append(part.sketch)
            self.sketch_at += part.sketch.numel()
        self.received += 1


class TableReplicas:
    """--replicas for the tables of server ``name`` (``tables``: its partitions; ``replication``: the copies and
    acknowledgements it shares with the dense keys)."""

    def __init__(self, name: str, job: JobConfig, tables: Tables, replication: Replication) -> None:
        self.name, self.job, self.tables, self.replication = name, job, tables, replication
        self._staged: dict[tuple[int, int], _Staged] = {}  # (table key, home) -> a seed being received
        if replication.enabled:
            tables.on_update = self.forward

    # -- a primary's side ------------------------------------------------------------------------------
    def forward(self, table: Table, update: RowUpdate) -> None:
        """Send ``update`` (about to be applied to ``table`` here) to each live backup of its home, as it is."""
        backups = self.replication.backups(table.handle)
        if not backups:
            return
        entry: KeyEntry = {"key": table.spec.key, "home": table.home, "version": table.version, "step": update.step,
                           "numel": update.ids.numel()}
        frames = [wire.ids_frame(update.ids), _frame(update.grads.to(torch.float32))]
        if update.lr is not None:
            entry["hp"] = {"lr": update.lr}
        if update.worker is not None:
            entry["worker"] = update.worker
        if update.sightings is not None:
            entry["sightings"] = True
            frames.append(_frame(update.sightings.to(torch.int64)))
        entry["nf"] = len(frames)
        record = [(table.handle.key, table.version + 1)]
        for backup in backups:
            self.replication.track(backup, Message(Kind.TABLE_REPLICATE, src=self.name, keys=[entry.copy()],
                                                   frames=list(frames)), record)
        self.replication.counters["replicated"] += len(backups)

    def send_seeds(self) -> None:
        """Seed the backups :attr:`Replication.reseed` names with the partitions it names (taken out of it: the
        dense keys' seeds are the rest)."""
        reseed, by_handle = self.replication.reseed, {t.handle.key: t for t in self.tables}
        for backup in sorted(reseed):
            mine = sorted(k for k in reseed[backup] if k in by_handle)
            if not mine:
                continue
            reseed[backup].difference_update(mine)
            if not reseed[backup]:
                del reseed[backup]
            if backup in self.replication.dead:
                continue
            sent = [by_handle[k] for k in mine if backup in self.replication.backups(by_handle[k].handle)]
            for table in sent:
                self.replication.seeding(backup, table.handle.key, table.version, self.seed_messages(table))
            if sent:
                log.warning("FAILOVER: %s: seeding server %d with %d table partitions (%s)", self.name, backup,
                            len(sent), ", ".join(f"{t.name!r} of server {t.home} at version {t.version}, "
                                                 f"{len(t.store)} rows" for t in sent[:5]))

    def seed_messages(self, table: Table) -> list[Message]:
        """``table``'s whole partition as it is now, in TABLE_SEED parts of at most the job's message size (and
        :data:`._seeds.MAX_SEED_BYTES`): the rows first, then the admission sketch, if any."""
        tensors, meta = table.store.export()  # (copies: the partition goes on changing)
        names = _row_names(table.spec)
        n = tensors["ids"].numel()
        per_row = sum(tensors[name][0].numel() * tensors[name].element_size() for name in names) if n else 1
        budget = max(1 << 12, min(self.job.max_message_bytes, MAX_SEED_BYTES) - HEADER_ROOM)
        rows_per, sketch_per = max(1, budget // per_row), max(1, budget // 4)
        pieces: list[tuple[int, int, list[int] | None]] = [(a, min(a + rows_per, n), None)
                                                           for a in range(0, n, rows_per)] or [(0, 0, None)]
        sketch = tensors.get("sketch")
        flat = sketch.reshape(-1) if sketch is not None else None
        if flat is not None:
            pieces += [(n, n, [a, min(sketch_per, SKETCH_SIZE - a)]) for a in range(0, SKETCH_SIZE, sketch_per)]
        common = {"table": table.spec.to_body(),
                  "failover": {"version": self.replication.version, "dead": sorted(self.replication.dead)},
                  "parts": len(pieces), "rows": n, "version": table.version, "steps": meta["steps"],
                  "clock": meta["clock"], "last": [[w, s] for w, s in sorted(table.last_step.items())]}
        out = []
        for i, (a, b, part_sketch) in enumerate(pieces):
            frames = [_frame(tensors[name][a:b]) for name in names]
            if part_sketch is not None:
                assert flat is not None
                frames.append(_frame(flat[part_sketch[0] : part_sketch[0] + part_sketch[1]]))
            entry: KeyEntry = {"key": table.spec.key, "home": table.home, "numel": b - a, "nf": len(frames)}
            out.append(Message(Kind.TABLE_SEED, src=self.name, keys=[entry], frames=frames,
                               body={**common, "part": i, "sketch": part_sketch}))
        return out

    # -- a backup's side -------------------------------------------------------------------------------
    def _check_kind(self) -> None:
        if not self.job.replicas:
            raise ProtocolError(ErrorCode.BAD_KIND, "this job has no --replicas: a server takes no table replicate "
                                                    "requests or seeds")

    @staticmethod
    def _one_entry(msg: Message, what: str) -> tuple[KeyEntry, list[Any]]:
        if msg.fused:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what} carries no fused frame")
        entries = list(msg.entries())
        if len(entries) != 1:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what} carries one entry, not {len(entries)}")
        return entries[0]

    def read_replicate(self, identity: bytes, msg: Message) -> TableReplicate:
        """A primary's update of a partition, checked whole (ProtocolError naming the problem; nothing changes):
        from the server the coordinator's topology makes the primary of the partition's home, of a partition held
        here, with well-typed fields, the ids of that home and frames of their sizes, and no update a copy would
        have to skip others to apply. A refusal names no version (a peer learns nothing it could forge one
        with)."""
        self._check_kind()
        sender = self.replication.sender(msg.src, "a table replicate request")
        entry, frames = self._one_entry(msg, "a table replicate request")
        table = self.tables._table(entry)
        spec = table.spec
        what = f"table replicate of table {spec.name!r} (rows of server {table.home})"
        self.replication.check_primary(table.home, sender, what)
        version, step, worker = entry.get("version"), entry.get("step"), entry.get("worker")
        if not is_int(version, 0, UNBOUNDED) or not is_int(step, 0, wire.MAX_TABLE_STEP + 1):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'version' must be a non-negative integer, 'step' one "
                                                      f"up to {wire.MAX_TABLE_STEP}")
        workers = self.job.worker_ranks
        if worker is not None and not is_int(worker, 0, workers):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'worker' must be a worker rank")
        if (worker is None) != (table.mode == "bsp"):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: an update of a {table.mode} table "
                                                      f"{'has no' if table.mode == 'bsp' else 'names its'} 'worker'")
        lr = wire.read_lr(entry.get("hp"), what)
        counted = entry.get("sightings", False)
        if not isinstance(counted, bool):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'sightings' must be true or false")
        n = wire.read_count(entry, workers * max(1, self.job.max_key_elements // spec.dim), what)
        nf = 3 if counted else 2
        if entry.get("nf") != nf or len(frames) != nf:
            raise ProtocolError(ErrorCode.FRAME_COUNT, f"{what}: {len(frames)} frames; it carries ids, gradient rows"
                                                       f"{' and sightings' if counted else ''}")
        ids = wire.read_ids(frames[0], n, what)
        if self.tables.num_servers > 1 and n and not bool(
                (wire.server_of(ids, self.tables.num_servers) == table.home).all()):
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: ids that are not rows of server {table.home}")
        grads = from_buffer(frames[1], torch.float32, n * spec.dim, f"{what}, gradient rows").clone().view(n, spec.dim)
        sightings = None
        if counted:
            sightings = from_buffer(frames[2], torch.int64, n, f"{what}, sightings").clone()
            if n and not bool(((sightings >= 1) & (sightings <= workers)).all()):
                raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: each row's sightings are in [1, {workers}]")
        request = TableReplicate(msg.id, sender, table,
                                 RowUpdate(ids, grads, lr["lr"] if lr else None, step, sightings, worker), version)
        if not request.held() and table.version < version:  # (a copy applies its primary's updates in order)
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: this copy missed updates before it",
                                detail=f"an update of version {version}, this copy is at {table.version}")
        return request

    def replicate(self, request: TableReplicate) -> TableDone:
        """Apply a primary's update as it did (one held already is acknowledged and skipped: applied once)."""
        if request.held():
            self.replication.counters["replica_duplicates"] += 1
            return self._ok(request.request_id), None, set(), False
        self.tables.apply(request.table, request.update)
        self.replication.counters["replica_applied"] += 1
        return self._ok(request.request_id), None, {request.table.handle.key}, False

    def read_seed(self, identity: bytes, msg: Message) -> SeedPart:
        """One part of a primary's seed of a partition, checked whole against the parts before it (nothing
        changes here): a live server's, well-typed, the next part of the seed being received, rows in ascending
        id order of the partition's home with frames of their sizes; the last part completes the rows and the
        sketch. Whether its sender is the home's primary is checked when the seed is taken, once this server heard
        of the failover it follows from the coordinator itself."""
        self._check_kind()
        sender = self.replication.sender(msg.src, "a table seed")
        body, spec, topology = wire.read_seed_body(msg.body, self.tables.num_servers, self.job.worker_ranks,
                                                   SKETCH_SIZE)
        entry, frames = self._one_entry(msg, "a table seed")
        home = entry.get("home")
        if entry["key"] != spec.key or not is_int(home, 0, self.tables.num_servers):
            raise ProtocolError(ErrorCode.BAD_HEADER, "a table seed's entry names its table's key and a 'home' server")
        what = f"seed of table {spec.name!r} (rows of server {home})"
        existing = self.tables.find(spec.key)
        if existing is not None and not existing.spec.same(spec):
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: the table is declared otherwise here")
        part = SeedPart(identity, msg.id, msg.src, sender, topology, body, spec, home, {}, None)
        staged = self._staged.get((spec.key, home)) if body["part"] else None
        if not body["part"] and (spec.key, home) not in self._staged and len(self._staged) >= MAX_STAGED:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"{what}: {MAX_STAGED} seeds are being received already")
        if body["part"] and (staged is None or staged.received != body["part"] or staged.scalars != part.scalars()):
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: part {body['part']} is not the next part of a seed "
                                                    "being received")
        had_rows, had_sketch = (staged.rows, staged.sketch_at) if staged is not None else (0, 0)
        n = wire.read_count(entry, body["rows"] - had_rows, what)
        names = _row_names(spec)
        nf = len(names) + (body["sketch"] is not None)
        if entry.get("nf") != nf or len(frames) != nf:
            raise ProtocolError(ErrorCode.FRAME_COUNT, f"{what}: {len(frames)} frames, not {nf}")
        ids = wire.read_ids(frames[0], n, what)
        if n and (not bool((ids[1:] > ids[:-1]).all())
                  or (staged is not None and staged.last_id is not None and int(ids[0]) <= staged.last_id)):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: the rows' ids must ascend across the parts")
        if self.tables.num_servers > 1 and n and not bool(
                (wire.server_of(ids, self.tables.num_servers) == home).all()):
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: ids that are not rows of server {home}")
        part.rows["ids"] = ids
        part.rows["values"] = from_buffer(frames[1], torch.float32, n * spec.dim, f"{what}, values").clone() \
            .view(n, spec.dim)
        part.rows["touched"] = from_buffer(frames[2], torch.int32, n, f"{what}, touched").clone()
        width = 1 if spec.optimizer == "rowwise_adagrad" else spec.dim
        for name, frame in zip(names[3:], frames[3:len(names)], strict=True):
            state = from_buffer(frame, torch.float32, n * width, f"{what}, {name}").clone()
            part.rows[name] = state if width == 1 else state.view(n, width)
        if body["sketch"] is not None:
            offset, count = body["sketch"]
            if offset != had_sketch:
                raise ProtocolError(ErrorCode.CONFLICT, f"{what}: a sketch slice out of order")
            part.sketch = from_buffer(frames[-1], torch.int32, count, f"{what}, sketch").clone()
            had_sketch += count
        if part.last and (had_rows + n != body["rows"] or had_sketch not in (0, SKETCH_SIZE)):
            raise ProtocolError(ErrorCode.FRAME_COUNT, f"{what}: the parts carry {had_rows + n} of its "
                                                       f"{body['rows']} rows and {had_sketch} of the sketch's "
                                                       f"{SKETCH_SIZE} elements")
        return part

    def seed(self, part: SeedPart) -> TableDone:
        """Keep a seed's part; the last one replaces the partition (or waits for the coordinator's notice of the
        failover it follows: only that topology says who may seed whom)."""
        key = (part.spec.key, part.home)
        if part.body["part"] == 0:
            self._staged[key] = _Staged(part.scalars())
        staged = self._staged[key]
        staged.add(part)
        if not part.last:
            return self._ok(part.request_id), None, set(), False
        del self._staged[key]
        if part.topology[0] > self.replication.version:
            return None, _TableSeeding(part.identity, part.request_id, -1 - part.sender, [],
                                       time.monotonic() + self.job.timeout, f"table seed from {part.src}",
                                       replicas=self, part=part, staged=staged), set(), False
        table = self.take(part, staged)
        return self._ok(part.request_id), None, {table.handle.key}, False

    def take(self, part: SeedPart, staged: _Staged) -> Table:
        """Replace the partition with a complete seed, once its sender is the home's primary in the coordinator's
        topology with this server as a live copy (ProtocolError, and nothing changes, unless)."""
        spec, home = part.spec, part.home
        what = f"seed of table {spec.name!r} (rows of server {home})"
        self.replication.check_topology(part.src, part.topology)
        self.replication.check_primary(home, part.sender, what)
        existing = self.tables.find(spec.key)
        if existing is not None and not existing.spec.same(spec):
            raise ProtocolError(ErrorCode.CONFLICT, f"{what}: the table is declared otherwise here")
        tensors = {name: torch.cat(found) for name, found in staged.tensors.items()}
        if staged.sketch:
            tensors["sketch"] = torch.cat(staged.sketch).view(SKETCH_DEPTH, SKETCH_WIDTH)
        store = RowStore(spec)
        store.load(tensors, {"steps": part.body["steps"], "clock": part.body["clock"]})
        # every check passed: now change state
        table = self.tables.parts.get((spec.key, home)) or self.tables.add(spec, home)
        if table.version != part.body["version"]:
            table.pushed.clear()
        table.store, table.version = store, part.body["version"]
        table.last_step = {w: s for w, s in part.body["last"]}
        self.replication.counters["seeds_taken"] += 1
        log.warning("FAILOVER: %s: seeded by server %d with the rows of server %d of table %r (%d rows, version %d)",
                    self.name, part.sender, home, spec.name, len(store), table.version)
        return table

    def _ok(self, request_id: int) -> Message:
        return Message(Kind.OK, id=request_id, src=self.name)


@dataclass(kw_only=True)
class _TableSeeding(Waiting):
    """--replicas: a complete table seed that follows a failover this server has not heard of yet, until the
    coordinator's notice comes (then it is checked against that topology and taken, or refused)."""

    replicas: TableReplicas
    part: SeedPart
    staged: _Staged

    def ready(self) -> bool:
        return self.part.topology[0] <= self.replicas.replication.version

    def answer(self) -> Message:
        self.replicas.take(self.part, self.staged)
        return self.replicas._ok(self.request_id)

    def why(self) -> str:
        return (f"it follows topology version {self.part.topology[0]}, and the coordinator has announced "
                f"{self.replicas.replication.version} to this server")
