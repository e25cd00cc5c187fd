"""Embedding tables larger than any worker: the servers hold the rows, a worker pulls the rows of a batch.

    table = worker.EmbeddingTable("items", dim=16, optimizer="adagrad:lr=0.05")
    for batch in worker.prefetching(loader, lambda b: {table: b.ids}):   # the next batch's rows come meanwhile
        pooled = table(batch.ids, batch.offsets)      # nn.EmbeddingBag's forward over the batch's rows
        loss = head(pooled, batch.dense).loss(batch.y)
        opt.zero_grad(); loss.backward()              # the table pushes its gradient rows from backward
        opt.step()                                    # a DistributedOptimizer steps the dense parameters

A training forward deduplicates the batch's ids, pulls each distinct id's row once from the server that holds it
(:func:`zps.protocol.tables.server_of`), and builds the output with ``torch.nn.functional.embedding_bag`` (or
``embedding``, :meth:`EmbeddingTable.lookup`) over those rows; its backward pushes one gradient row per distinct
id, and the servers apply the table's row-wise optimizer to those rows only. Each training forward is one step of
the table (BSP: step ``t``'s rows are the values after ``t`` steps of every worker, as a DistributedOptimizer's
parameters are); a forward under ``torch.no_grad()`` reads the current rows and is no step. The table module has
no parameters: a model holding one can be given to a DistributedOptimizer as it is.

Started by no launcher, the table lives in this process and is updated at backward (one BSP worker's result).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from zps.protocol import tables as wire
from zps.protocol.messages import Kind, Message
from zps.protocol.rowstore import RowStore
from zps.protocol.tables import TableSpec

from .client import Client
from .local import LocalClient
from .session import default_client

log = logging.getLogger("zps.worker")
B = TypeVar("B")
MODES = ("sum", "mean", "max")
# glibc's M_MMAP_THRESHOLD and the size from which a worker's buffers are mapped and unmapped whole (below)
_M_MMAP_THRESHOLD, BIG_BUFFER = -3, 2 << 20
_malloc_set = False


def _big_buffers_to_the_os() -> None:
    """Allocations of :data:`BIG_BUFFER` bytes or more are mapped on their own and go back to the system when freed
    (glibc, unless ``MALLOC_MMAP_THRESHOLD_`` says otherwise). A table's step allocates and frees a few buffers of
    the batch's rows (pulled rows, gradient rows, their frames); glibc's default raises its mapping threshold to the
    largest buffer freed, after which such buffers come from the heap, whose free pieces between live allocations
    stay resident: a worker pushing 65,536 new 16-wide rows per step (4 MiB buffers) peaked at ~360 MiB that way,
    at 329 MiB with this (325 with 1 MiB, 333 with 4 MiB; malloc_trim after every step: 339, and 1-18 ms a call).
    The price: a mapped buffer's pages fault in afresh each time (~1 us per 4 KiB page here: 2 MiB of zeros take
    ~0.5 ms instead of ~0.06), hence 2 MiB, above a 4096-id batch of 64-wide rows (1 MiB). Set once, by the first
    table of a worker."""
    global _malloc_set
    if _malloc_set or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    _malloc_set = True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # (absent outside glibc, e.g. musl: nothing to do)
    except (OSError, AttributeError):
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(_M_MMAP_THRESHOLD, BIG_BUFFER)


@dataclass
class _Split:
    """A batch's distinct ids (sorted) and, per server, the positions among them of the ids it holds."""

    ids: torch.Tensor
    parts: dict[int, torch.Tensor]
    whole: bool = False  # one server holds every id: ``parts`` is ``{server: arange(n)}``, no gather needed


class _Rows:
    """Rows on their way: :meth:`get` waits for them (in the caller's thread) and assembles them in id order."""

    def __init__(self, split: _Split, dim: int, future: Future | None, values: torch.Tensor | None = None) -> None:
        self.split, self.dim, self.future, self.values = split, dim, future, values

    def get(self, key: int) -> torch.Tensor:
        if self.values is not None:
            return self.values
        assert self.future is not None
        replies = self.future.result()
        whole = len(self.split.parts) == 1 and self.split.whole
        out = None if whole else torch.empty(self.split.ids.numel(), self.dim)
        for server, where in self.split.parts.items():
            msg: Message = replies[server]
            (entry, frames), = list(msg.entries())
            if entry.get("key") != key or entry.get("numel") != where.numel():
                raise RuntimeError(f"server {server} answered a rows pull with {entry.get('numel')} rows of key "
                                   f"{entry.get('key')}, not {where.numel()} of {key}")
            # a view of the frame, never copied to be copied again: one server holding every id sends the batch's
            # rows, in their order (the view is the rows: nothing writes them, autograd reads them); else each
            # server's rows go from the frame to their places
            rows = wire.decode_rows(frames, str(entry.get("codec", "none")), where.numel(), self.dim,
                                    f"rows from server {server}", copy=False)
            if out is None:
                out = rows
            else:
                out.numpy()[where.numpy()] = rows.numpy()
        del replies
        assert out is not None
        self.values, self.future = out, None
        return out


def unique_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(ids.view(-1), return_inverse=True)`` on the CPU (the distinct ids sorted, and where each id is
    among them), by numpy's argsort: half torch.unique's time for a batch of 4096 ids (the same result: a batch's
    inverse does not depend on how its ties were ordered)."""
    flat = ids.detach().reshape(-1).to("cpu", torch.int64).numpy()
    if flat.size == 0:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    order = np.argsort(flat)
    ordered = flat[order]
    first = np.empty(ordered.size, dtype=bool)  # where a new id starts in the sorted batch
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(ordered.size, dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return torch.from_numpy(ordered[first]), torch.from_numpy(inverse)


class _Gather(torch.autograd.Function):
    """``F.embedding(inverse, rows)`` on the CPU, whose backward sums the gradient rows of each distinct id with one
    ``index_add_`` (in the order the ids come, as F.embedding's does: the same bits) rather than its sorting path for
    more than 3000 ids (2-3x slower for a 4096-id batch)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.rows = rows.shape[0]
        return rows.index_select(0, inverse)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (inverse,) = ctx.saved_tensors
        out = torch.zeros(ctx.rows, grad.shape[-1], dtype=grad.dtype)
        return out.index_add_(0, inverse, grad.reshape(-1, grad.shape[-1])), None


class _Remote:
    """A table on the servers of ``client``'s job."""

    def __init__(self, client: Client, spec: TableSpec) -> None:
        self.client, self.spec = client, spec
        self.servers = client.topology.num_servers
        _big_buffers_to_the_os()
        self.counters = {"rows_pulled": 0, "rows_pushed": 0, "bytes_pulled": 0, "bytes_pushed": 0}
        self._pushes: list[Future] = []
        parts = [(s, Message(Kind.TABLE, src=client.name, body=spec.to_body())) for s in self._live()]
        replies = client._engine.submit(parts, f"declare of table {spec.name!r}", keep_replies=True).result()
        self.start = max((int(replies[s].get("step", 0)) for s in replies), default=0)
        client.before_close.append(self.drain)
        client.table_servers.update(self._live())
        self._marked = 0  # the newest checkpoint this table's pushes told the servers of

    def _live(self) -> list[int]:
        return self.client._live_servers()

    def split(self, ids: torch.Tensor) -> _Split:
        if self.servers == 1:
            return _Split(ids, {0: torch.arange(ids.numel())}, whole=True)
        home = wire.server_of(ids, self.servers)
        order = torch.argsort(home, stable=True)
        counts = torch.bincount(home, minlength=self.servers).tolist()
        parts, at = {}, 0
        for server, n in enumerate(counts):
            if n:
                parts[server] = order[at : at + n]
            at += n
        return _Split(ids, parts, whole=len(parts) == 1)

    def pull(self, split: _Split, step: int) -> _Rows:
        parts = []
        for server, where in split.parts.items():
            ids = split.ids if split.whole else split.ids.index_select(0, where)
            entry = wire.row_entry(self.spec.key, step, ids.numel(), nf=1, home=server)
            if self.spec.codec != "none":
                entry["pc"] = self.spec.codec
            parts.append((server, Message(Kind.ROWS_PULL, src=self.client.name, keys=[entry],
                                          frames=[wire.ids_frame(ids)])))
            self.counters["rows_pulled"] += ids.numel()
            self.counters["bytes_pulled"] += 8 * ids.numel() + self._row_bytes(ids.numel())
        if not parts:
            return _Rows(split, self.spec.dim, None, torch.empty(0, self.spec.dim))
        future = self.client._engine.submit(parts, f"rows pull of table {self.spec.name!r} at step {step}",
                                            keep_messages=True)
        return _Rows(split, self.spec.dim, future)

    def _row_bytes(self, n: int) -> int:
        per = {"none": 4 * self.spec.dim, "fp16": 2 * self.spec.dim, "int8": self.spec.dim + 4}[self.spec.codec]
        return n * per

    def push(self, split: _Split, grads: torch.Tensor, step: int, lr: float) -> None:
        """Push the gradient rows of ``step`` for every server's rows (none for a server without ids: every server
        counts every step; with --replicas the engine sends each to the live primary of those rows)."""
        self._check_pushes()
        parts = []
        hp = None if lr == self.spec.hp["lr"] else {"lr": lr}
        body = {}
        asked = self.client.checkpoint_requested  # (BSP: checkpoint V is the table's state at step V)
        if asked > self._marked and (asked == step or self.client.topology.mode != "bsp"):
            self._marked = asked
            body["ckpt"] = asked
        for server in range(self.servers):
            where = split.parts.get(server)
            if where is None:
                ids, rows = torch.empty(0, dtype=torch.int64), torch.empty(0, self.spec.dim)
            elif split.whole:
                ids, rows = split.ids, grads
            else:
                ids, rows = split.ids.index_select(0, where), grads.index_select(0, where)
            frames, size = wire.encode_rows(rows, self.spec.codec)
            entry = wire.row_entry(self.spec.key, step, ids.numel(), nf=1 + len(frames), codec=self.spec.codec,
                                   home=server)
            if hp is not None:
                entry["hp"] = hp
            parts.append((server, Message(Kind.ROWS_PUSH, src=self.client.name, keys=[entry], body=body,
                                          frames=[wire.ids_frame(ids), *frames])))
            self.counters["rows_pushed"] += ids.numel()
            self.counters["bytes_pushed"] += 8 * ids.numel() + size
        self._pushes.append(self.client._engine.submit(parts, f"rows push of table {self.spec.name!r} at step {step}"))

    def _check_pushes(self) -> None:
        """Raise what a finished push failed with; keep at most two in flight."""
        while len(self._pushes) > 2 or (self._pushes and self._pushes[0].done()):
            self._pushes.pop(0).result()

    def drain(self) -> None:
        while self._pushes:
            self._pushes.pop(0).result()

    def stats(self) -> list[dict[str, Any]]:
        return [s["tables"][self.spec.name] for s in self.client.stats()]


class _Local:
    """A table held whole in this process (a script started by no launcher)."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.store = RowStore(spec)
        self.start = 0
        self.counters = {"rows_pulled": 0, "rows_pushed": 0, "bytes_pulled": 0, "bytes_pushed": 0}

    def split(self, ids: torch.Tensor) -> _Split:
        return _Split(ids, {0: torch.arange(ids.numel())}, whole=True)

    def pull(self, split: _Split, step: int) -> _Rows:
        self.counters["rows_pulled"] += split.ids.numel()
        return _Rows(split, self.spec.dim, None, self.store.read(split.ids))

    def push(self, split: _Split, grads: torch.Tensor, step: int, lr: float) -> None:
        self.counters["rows_pushed"] += split.ids.numel()
        self.store.apply(split.ids, grads, lr, step)

    def drain(self) -> None:
        pass

    def stats(self) -> list[dict[str, Any]]:
        store = self.store
        return [{"rows": len(store), "version": store.steps, "mode": "local", **self.counters, **store.counters,
                 **{f"{k}_bytes": v for k, v in store.nbytes().items()}}]


@dataclass
class _Open:
    """A training forward whose backward has not pushed yet."""

    step: int
    split: _Split
    device: torch.device


class EmbeddingTable(torch.nn.Module):
    """A table of ``dim``-wide rows indexed by any int64 id, held on the parameter servers (see the module
    docstring).

    ``mode``: the pooling of :meth:`forward` (``sum``, ``mean``, ``max``: nn.EmbeddingBag's); ``optimizer``: the
    servers' row-wise optimizer as a spec, ``NAME[:key=value,...]`` (``sgd``, ``adagrad``, ``rowwise_adagrad``,
    ``sparse_adam``, :data:`zps.protocol.tables.ROW_OPTIMIZERS`); ``init``, ``init_scale``, ``seed``: the initial
    values (a function of name, id and seed); ``admit``, ``expire``, ``max_rows``: admission after that many
    sightings, expiry after that many steps without an update, the rows one server holds at most; ``sync="async"``:
    apply this table's pushes as they come whatever the job's mode (tables asynchronous, dense synchronous);
    ``codec``: ``none``, ``fp16`` or ``int8`` rows on the wire. Every worker declares the same tables, in the same
    order, after :func:`zps.worker.init`."""

    def __init__(self, name: str, dim: int, *, mode: str = "mean", optimizer: str = "sgd:lr=0.01",
                 init: str = "uniform", init_scale: float | None = None, seed: int = 0, admit: int = 1,
                 expire: int = 0, max_rows: int = 0, sync: str = "", codec: str = "none", prefetch_depth: int = 1,
                 client: Client | LocalClient | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"table {name!r}: mode must be one of {', '.join(MODES)}, got {mode!r}")
        opt_name, hp = wire.parse_optimizer(optimizer)
        self.spec = TableSpec(name, dim, opt_name, hp, init, init_scale, seed, admit, expire, max_rows, sync, codec)
        self.mode, self.prefetch_depth = mode, max(0, prefetch_depth)
        self.lr = float(self.spec.hp["lr"])  # the learning rate of the coming steps (a schedule may change it)
        client = client if client is not None else default_client()
        self._backend: _Remote | _Local = (_Local(self.spec) if isinstance(client, LocalClient)
                                           else _Remote(client, self.spec))
        self.step = self._backend.start  # the step the next training forward takes (steps pushed so far)
        self._open: _Open | None = None
        self._prefetched: dict[int, _Rows] = {}
        self._warned = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def counters(self) -> dict[str, int]:
        """Rows and bytes this worker pulled and pushed (logical: ids and rows as encoded)."""
        return dict(self._backend.counters)

    def extra_repr(self) -> str:
        return f"{self.name!r}, dim={self.dim}, mode={self.mode!r}, optimizer={self.spec.optimizer}"

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        """nn.EmbeddingBag's forward: ``ids`` 1-D with ``offsets`` (bags start there), or 2-D (one bag per row);
        pooled by ``mode``, weighted by ``per_sample_weights`` (``sum`` only)."""
        inverse, rows = self._rows(ids)
        if offsets is None and ids.dim() != 2:
            raise ValueError(f"table {self.name!r}: 1-D ids need offsets (or use lookup() for one row per id)")
        return F.embedding_bag(inverse.view(ids.shape), rows, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """nn.Embedding's forward: one row per id, ``ids.shape + (dim,)``."""
        inverse, rows = self._rows(ids)
        if rows.device.type == "cpu":
            return _Gather.apply(rows, inverse.view(-1)).view(*ids.shape, self.dim)
        return F.embedding(inverse.view(ids.shape), rows)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The current values of rows ``ids`` (the steps this worker pushed applied), without a step."""
        with torch.no_grad():
            inverse, rows = self._rows(ids)
        return rows.index_select(0, inverse.view(-1)).view(*ids.shape, self.dim)

    def _unique(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return unique_ids(ids)

    def _rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"table {self.name!r}: ids must be int64 or int32, got {ids.dtype}")
        unique, inverse = self._unique(ids)
        inverse = inverse.to(ids.device)
        if not torch.is_grad_enabled():
            split = self._backend.split(unique)
            return inverse, self._backend.pull(split, self.step).get(self.spec.key).to(ids.device)
        if self._open is not None:  # the previous training forward had no backward: its step pushes nothing
            if not self._warned:
                self._warned = True
                log.warning("table %r: step %d's forward had no backward before the next forward; it pushes no "
                            "gradient (one training forward per step; evaluate under torch.no_grad())", self.name,
                            self._open.step)
            stale = self._open  # (no ids: every server counts the step, no row changes)
            self._push(_Open(stale.step, _Split(unique[:0], {}, whole=True), stale.device), torch.empty(0, self.dim))
        step = self.step
        for old in [s for s in self._prefetched if s < step]:
            del self._prefetched[old]
        pending = self._prefetched.pop(step, None)
        if pending is None or not torch.equal(pending.split.ids, unique):
            pending = self._backend.pull(self._backend.split(unique), step)
        values = pending.get(self.spec.key)
        rows = values.to(ids.device).requires_grad_()
        opened = self._open = _Open(step, pending.split, ids.device)
        rows.register_hook(lambda grad: self._backward(opened, grad))
        return inverse, rows

    def _backward(self, opened: _Open, grad: torch.Tensor) -> None:
        if self._open is not opened:
            raise RuntimeError(f"table {self.name!r}: the backward of step {opened.step} came after a later forward: "
                               "call a table once per training step (concatenate the ids of a step, or use one "
                               "table per feature)")
        self._push(opened, grad.detach().to("cpu", torch.float32))

    def _push(self, opened: _Open, grad: torch.Tensor) -> None:
        self._open = None
        self.step = opened.step + 1
        self._backend.push(opened.split, grad, opened.step, self.lr)

    # -- prefetch ------------------------------------------------------------------------------------
    def prefetch(self, ids: torch.Tensor) -> None:
        """Start pulling the rows of ``ids`` for a coming training forward -- the first step not prefetched yet
        (the next one, or the one after a forward whose backward is to come) -- so they travel while this step
        computes. A forward whose ids differ pulls its own."""
        if self.prefetch_depth == 0:
            return
        step = self.step + (1 if self._open is not None else 0)
        while step in self._prefetched:
            step += 1
        if step - self.step > self.prefetch_depth:
            return
        unique, _ = self._unique(ids)
        self._prefetched[step] = self._backend.pull(self._backend.split(unique), step)

    def synchronize(self) -> None:
        """Wait until every push this worker sent was acknowledged (raising what one failed with)."""
        self._backend.drain()

    def stats(self) -> list[dict[str, Any]]:
        """Per server, this table's record there (rows held, bytes, rows pulled and pushed, admissions,
        evictions: ``zps.ps._tables.Tables.stats``); one record for a table held in this process."""
        return self._backend.stats()


def prefetching(batches: Iterable[B], ids: Callable[[B], Mapping[EmbeddingTable, torch.Tensor]]) -> Iterator[B]:
    """Yield ``batches`` while the rows of the next one are pulled: before yielding a batch, every table of
    ``ids(next batch)`` prefetches that batch's ids (the data loader drives the overlap)."""
    it = iter(batches)
    end = object()
    coming: Any = next(it, end)
    if coming is not end:
        for table, wanted in ids(coming).items():
            table.prefetch(wanted)
    while coming is not end:
        current, coming = coming, next(it, end)
        if coming is not end:
            for table, wanted in ids(coming).items():
                table.prefetch(wanted)
        yield current
