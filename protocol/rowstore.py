"""The rows of one table that one process holds, and the row-wise optimizers that update them.

A server holds its share of every table in a :class:`RowStore`; a script started by no launcher holds its whole
table in one (:mod:`zps.worker.embedding`). Both must compute the same bits, and a checkpoint holds a store's state,
which is why it is here.

- :class:`HashIndex`: int64 id -> slot, open addressing with linear probing, every operation vectorised over a
  batch of ids (a probe round is a few tensor operations over the ids still unresolved); tombstones for evicted ids,
  rebuilt when they pile up.
- :class:`RowStore`: the slots' values (one ``(capacity, dim)`` float32 tensor, grown by half when full), each
  row's optimizer state beside it, the step each row was last updated at; rows are created at their first update
  (:meth:`RowStore.apply`), before which they read as :func:`zps.protocol.tables.initial_rows`.
- The optimizers, applied to the updated rows only, in the arithmetic of torch's sparse paths (so a single process
  with ``nn.EmbeddingBag(sparse=True)`` and torch's optimizer computes the same bits): ``sgd`` (torch.optim.SGD),
  ``adagrad`` (torch.optim.Adagrad, element-wise state), ``rowwise_adagrad`` (one accumulator per row, the mean of
  the squared gradient row: FBGEMM's exact row-wise Adagrad), ``sparse_adam`` (torch.optim.SparseAdam: lazy moments,
  one step count per table).
- Admission (``admit`` > 1): sightings of ids not stored yet are counted in a count-min sketch (4 x 2^20 int32
  counters, allocated at the first update of an id not stored); a row is stored once its estimate reaches
  ``admit`` (a sketch never undercounts, so no later than its ``admit``-th sighting). Expiry (``expire``): rows not
  updated for that many steps are evicted. ``max_rows``: never exceeded; the rows updated least recently (ties:
  the smaller id) are evicted to make room, at least 1/64 of the cap at a time, never one updated in the same step;
  new rows beyond what fits are dropped.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .tables import TableSpec, initial_rows, mix64

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing
EMPTY, DELETED = -1, -2
WIDTH = 4  # places of a bucket of the index (4 ids: 32 bytes of keys)
SKETCH_DEPTH, SKETCH_WIDTH = 4, 1 << 20
COUNTERS = ("rows_created", "rows_admitted", "rows_evicted_expired", "rows_evicted_cap", "rows_dropped",
            "rows_refused", "rows_updated")


class HashIndex:
    """int64 id -> slot, vectorised (see the module docstring): buckets of :data:`WIDTH` places, one cache line of
    keys each, probed bucket after bucket (linear probing over buckets); numpy, whose small operations cost a
    fraction of torch's, with the four places of a bucket compared column by column."""

    def __init__(self, capacity: int = 1024) -> None:
        self._alloc(max(1024, 1 << (capacity - 1).bit_length()))
        self.used = 0  # live ids
        self.tombs = 0

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity  # places
        self.buckets = capacity // WIDTH
        self._shift = np.uint64(64 - (self.buckets.bit_length() - 1))
        self.keys = np.zeros((self.buckets, WIDTH), dtype=np.int64)
        self.slots = np.full((self.buckets, WIDTH), EMPTY, dtype=np.int32)

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return ((ids.view(np.uint64) * _GOLDEN) >> self._shift).astype(np.int64)

    def _probe(self, bucket: np.ndarray, want: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One probe round: each id's match in its bucket as a (n, WIDTH) map of slots (-1 elsewhere), its slot (-1:
        not there), and whether its search goes on to the next bucket (absent here, and the bucket is full)."""
        keys, slots = np.take(self.keys, bucket, axis=0), np.take(self.slots, bucket, axis=0)
        # a live place holding the id (a tombstone of it may be there too: the live slot is the larger)
        hits = np.where(keys == want[:, None], slots, EMPTY)
        slot = np.maximum(np.maximum(hits[:, 0], hits[:, 1]), np.maximum(hits[:, 2], hits[:, 3]))
        empty = slots == EMPTY
        go = (slot < 0) & ~(empty[:, 0] | empty[:, 1] | empty[:, 2] | empty[:, 3])
        return hits, slot, go

    def _find(self, ids: np.ndarray, places: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """For each id: its slot (-1 where absent) and, with ``places``, its place (bucket * WIDTH + column)."""
        n = ids.size
        if n == 0 or self.used == 0:
            return np.full(n, EMPTY, dtype=np.int64), np.full(n, EMPTY, dtype=np.int64)
        bucket = self._home(ids)
        hits, slot, go = self._probe(bucket, ids)
        slot_out = slot.astype(np.int64)
        place_out = self._places(bucket, hits, slot) if places else slot_out
        if go.any():  # (a few: their bucket was full) on to the next buckets
            which = np.flatnonzero(go)
            more_slot, more_place = self._find_from((bucket[which] + 1) & (self.buckets - 1), ids[which], places)
            slot_out[which] = more_slot
            if places:
                place_out[which] = more_place
        return slot_out, place_out

    def _find_from(self, bucket: np.ndarray, want: np.ndarray, places: bool) -> tuple[np.ndarray, np.ndarray]:
        slot_out = np.full(want.size, EMPTY, dtype=np.int64)
        place_out = np.full(want.size, EMPTY, dtype=np.int64)
        which, last = np.arange(want.size), self.buckets - 1
        while which.size:
            hits, slot, go = self._probe(bucket, want)
            slot_out[which] = slot
            if places:
                place_out[which] = self._places(bucket, hits, slot)
            bucket, which, want = (bucket[go] + 1) & last, which[go], want[go]
        return slot_out, place_out

    @staticmethod
    def _places(bucket: np.ndarray, hits: np.ndarray, slot: np.ndarray) -> np.ndarray:
        col = np.argmax(hits == slot[:, None], axis=1)
        return np.where(slot >= 0, bucket * WIDTH + col, EMPTY)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The slot of each id (int64 tensor), -1 where absent."""
        return torch.from_numpy(self._find(ids.contiguous().numpy())[0])

    def insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Map each of ``ids`` (distinct, none present) to its slot."""
        n = ids.numel()
        if n == 0:
            return
        if (self.used + self.tombs + n) * 10 > self.capacity * 8:
            self._rebuild(self.used + n)
        self._insert(ids.contiguous().numpy(), slots.contiguous().numpy().astype(np.int32))
        self.used += n

    def _insert(self, want: np.ndarray, value: np.ndarray) -> None:
        keys, slots = self.keys.reshape(-1), self.slots.reshape(-1)
        bucket, last = self._home(want), self.buckets - 1
        while want.size:
            free = np.take(self.slots, bucket, axis=0) < 0
            has = free[:, 0] | free[:, 1] | free[:, 2] | free[:, 3]
            col = np.where(free[:, 0], 0, np.where(free[:, 1], 1, np.where(free[:, 2], 2, 3)))
            place = bucket * WIDTH + col
            fp, fw = place[has], want[has]
            keys[fp] = fw  # several may aim at one place: the one that stays there has it
            won = keys[fp] == fw
            taken = fp[won]
            self.tombs -= int(np.count_nonzero(slots[taken] == DELETED))
            slots[taken] = value[has][won]
            lost = ~has
            lost[np.flatnonzero(has)[~won]] = True
            # a full bucket: on to the next; beaten to a free place: this bucket again
            bucket = np.where(has, bucket, (bucket + 1) & last)[lost]
            want, value = want[lost], value[lost]

    def remove(self, ids: torch.Tensor) -> None:
        """Forget ``ids`` (each present)."""
        places = self._find(ids.contiguous().numpy(), places=True)[1]
        self.slots.reshape(-1)[places] = DELETED
        self.used -= ids.numel()
        self.tombs += ids.numel()

    def _rebuild(self, live: int) -> None:
        keys, slots = self._items()
        capacity = 1024
        while live * 2 > capacity:
            capacity *= 2
        self._alloc(capacity)
        self.tombs = 0
        for at in range(0, keys.size, 1 << 20):  # (in pieces: the temporaries of one piece stay small)
            self._insert(keys[at : at + (1 << 20)], slots[at : at + (1 << 20)])

    def _items(self) -> tuple[np.ndarray, np.ndarray]:
        held = self.slots >= 0
        return self.keys[held], self.slots[held]

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (id, slot) held."""
        keys, slots = self._items()
        return torch.from_numpy(keys), torch.from_numpy(slots.astype(np.int64))

    def nbytes(self) -> int:
        return self.capacity * 12


def _gather(tensor: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``tensor[slots]`` along the first dimension, a new tensor: numpy's take, which gathers rows a fifth faster than
    ``index_select`` (the same bits: a gather copies)."""
    return torch.from_numpy(np.take(tensor.numpy(), slots.numpy(), axis=0))


def _scatter(tensor: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """``tensor[slots] = rows`` (distinct slots, ``rows`` of ``tensor``'s dtype): numpy's assignment, about twice as
    fast as ``index_copy_`` for rows of 16 to 64 floats (the same bits: a scatter copies)."""
    tensor.numpy()[slots.numpy()] = rows.numpy()


def _add(values: torch.Tensor, slots: torch.Tensor, update: torch.Tensor, alpha: float) -> None:
    """``values[slots] += alpha * update`` (distinct slots) with the rounding of torch's dense += sparse with alpha,
    gathered, added and put back: index_add_ with alpha takes a slower path to the same bits."""
    _scatter(values, slots, _gather(values, slots).add_(update, alpha=alpha))


def state_names(optimizer: str) -> tuple[str, ...]:
    """The names of a row optimizer's state tensors, in the order a store keeps them (one float32 element per row
    for ``rowwise_adagrad``, ``dim`` for the others)."""
    return {"sgd": (), "adagrad": ("sum",), "rowwise_adagrad": ("sum",), "sparse_adam": ("exp_avg", "exp_avg_sq")
            }[optimizer]


class RowStore:
    """The rows of table ``spec`` one process holds (see the module docstring)."""

    def __init__(self, spec: TableSpec, capacity: int = 1024) -> None:
        self.spec = spec
        self.dim = spec.dim
        self.index = HashIndex(2 * min(capacity, spec.max_rows or capacity))
        self.capacity = 0
        self.size = 0  # slots handed out (evicted ones are reused first: ``_free``)
        self._free = torch.empty(0, dtype=torch.int64)
        self.ids = torch.empty(0, dtype=torch.int64)
        self.values = torch.empty(0, spec.dim)
        self.touched = torch.empty(0, dtype=torch.int32)  # the step of each slot's latest update
        self.state: dict[str, torch.Tensor] = {}
        self.steps = 0  # optimizer steps taken (SparseAdam's and Adagrad's ``step``)
        self.clock = 0  # the newest step an update was applied at (expiry counts from it)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.sketch: torch.Tensor | None = None  # admission's counters, from the first push of a new id (16 MB)
        # under a cap, room for all of it at once: memory the rows never touch is never resident (the pages of a
        # large allocation are committed as they are first written), and the table never moves
        self._grow(spec.max_rows or capacity)

    def __len__(self) -> int:
        return self.index.used

    # -- memory ----------------------------------------------------------------------------------------
    def _state_shape(self, name: str, rows: int) -> tuple[int, ...]:
        return (rows,) if self.spec.optimizer == "rowwise_adagrad" else (rows, self.dim)

    def _grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return

        def grown(old: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
            new = torch.empty(shape, dtype=old.dtype)
            new[: self.size] = old[: self.size]
            return new

        self.ids = grown(self.ids, (capacity,))
        self.values = grown(self.values, (capacity, self.dim))
        self.touched = grown(self.touched, (capacity,))
        for name in state_names(self.spec.optimizer):
            old = self.state.get(name, torch.empty(self._state_shape(name, 0)))
            self.state[name] = grown(old, self._state_shape(name, capacity))
        self.capacity = capacity

    def nbytes(self) -> dict[str, int]:
        """Bytes held: the rows' values, their optimizer state, and the index (ids, slots, last updates)."""
        state = sum(t.numel() * t.element_size() for t in self.state.values())
        book = self.index.nbytes() + self.capacity * 16 + (self.sketch.numel() * 4 if self.sketch is not None else 0)
        return {"values": self.values.numel() * 4, "state": state, "index": book}

    # -- reading -------------------------------------------------------------------------------------
    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """(n, dim) values of ``ids``: the stored rows, and the initial value of every id not stored."""
        slots = self.index.lookup(ids)
        held = slots.numpy() >= 0  # (numpy's small operations cost a fraction of torch's)
        if held.all():
            return _gather(self.values, slots)
        out = torch.empty(ids.numel(), self.dim)
        held_t = torch.from_numpy(held)
        if held.any():
            out[held_t] = _gather(self.values, slots[held_t])
        out[~held_t] = initial_rows(self.spec, ids[~held_t])
        return out

    # -- updating ------------------------------------------------------------------------------------
    def apply(self, ids: torch.Tensor, grads: torch.Tensor, lr: float | None, step: int,
              sightings: torch.Tensor | None = None) -> int:
        """One optimizer step over rows ``ids`` (distinct) with gradient rows ``grads``, at ``step`` (one step
        count even with no ids, as torch's optimizers count a step with an empty sparse gradient). ``sightings``:
        how many workers' gradients each row sums (admission counts them; default one each). Returns the rows
        updated."""
        self.steps += 1
        self.clock = max(self.clock, step)
        hp = self.spec.hp if lr is None else {**self.spec.hp, "lr": lr}
        if self.spec.expire and step % max(1, self.spec.expire // 4) == 0:
            self._expire()
        if ids.numel() == 0:
            return 0
        slots = self.index.lookup(ids)
        if (slots.numpy() < 0).any():
            new = slots < 0
            keep = self._admit(ids, new, sightings)
            if keep is not None:
                ids, grads, slots, new = ids[keep], grads[keep], slots[keep], new[keep]
            slots[new] = self._create(ids[new], exclude=slots[~new])
            placed = slots >= 0
            if not bool(placed.all()):  # refused for the cap
                ids, grads, slots = ids[placed], grads[placed], slots[placed]
        if slots.numel():
            self._step(slots, grads, hp)
            self.touched.numpy()[slots.numpy()] = step
        self.counters["rows_updated"] += slots.numel()
        return slots.numel()

    def _admit(self, ids: torch.Tensor, new: torch.Tensor, sightings: torch.Tensor | None) -> torch.Tensor | None:
        """Admission: which rows stay (None: all); the gradients of ids not admitted yet are dropped."""
        if self.spec.admit <= 1:
            return None
        if self.sketch is None:
            self.sketch = self._new_sketch()
        fresh = ids[new]
        counts = (sightings[new] if sightings is not None else torch.ones(fresh.numel(), dtype=torch.int64))
        places = self._sketch_places(fresh)
        estimate = None
        for d in range(SKETCH_DEPTH):
            row = self.sketch[d]
            row.index_add_(0, places[d], counts.to(torch.int32))
            seen = row[places[d]]
            estimate = seen if estimate is None else torch.minimum(estimate, seen)
        assert estimate is not None
        admitted = estimate >= self.spec.admit
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[new.nonzero().squeeze(1)[~admitted]] = False
        self.counters["rows_admitted"] += int(admitted.sum())
        self.counters["rows_dropped"] += int((~admitted).sum())
        return keep

    @staticmethod
    def _new_sketch() -> torch.Tensor:
        return torch.zeros(SKETCH_DEPTH, SKETCH_WIDTH, dtype=torch.int32)

    def _sketch_places(self, ids: torch.Tensor) -> list[torch.Tensor]:
        u64 = ids.contiguous().numpy().view(np.uint64)
        return [torch.from_numpy((mix64(u64 ^ np.uint64(0x51ED27 + 7919 * d)) & np.uint64(SKETCH_WIDTH - 1))
                                 .astype(np.int64)) for d in range(SKETCH_DEPTH)]

    def _create(self, ids: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
        """Slots for new rows ``ids`` with their initial values and fresh optimizer state; under the cap, -1 for those
        that do not fit once room was made (``exclude``: slots not to evict, those of this update)."""
        n = ids.numel()
        cap = self.spec.max_rows
        if cap and len(self) + n > cap:
            self._evict_oldest(len(self) + n - cap, exclude)
            room = cap - len(self)
            if room < n:
                self.counters["rows_refused"] += n - room
                out = torch.full((n,), -1, dtype=torch.int64)
                out[:room] = self._create(ids[:room], exclude)
                return out
        reused = self._free[:n]
        self._free = self._free[n:]
        fresh = n - reused.numel()
        if self.size + fresh > self.capacity:
            self._grow(max(self.size + fresh, math.ceil(self.capacity * 1.5), 1024))
        slots = torch.cat([reused, torch.arange(self.size, self.size + fresh)])
        self.size += fresh
        self.index.insert(ids, slots)
        self.ids[slots] = ids
        self.values[slots] = initial_rows(self.spec, ids)
        for name, tensor in self.state.items():
            tensor[slots] = self.spec.hp.get("initial_accumulator_value", 0.0) if name == "sum" else 0.0
        self.counters["rows_created"] += n
        return slots

    def _live(self) -> torch.Tensor:
        return self.index.items()[1]

    def _evict(self, slots: torch.Tensor, why: str) -> None:
        if slots.numel() == 0:
            return
        self.index.remove(self.ids[slots])
        self._free = torch.cat([self._free, slots])
        self.counters[why] += slots.numel()

    def _expire(self) -> None:
        slots = self._live()
        self._evict(slots[self.touched[slots] < self.clock - self.spec.expire], "rows_evicted_expired")

    def _evict_oldest(self, need: int, exclude: torch.Tensor) -> None:
        """Evict at least ``need`` rows (and 1/64 of the cap), the least recently updated first, ties by id."""
        slots = self._live()
        if exclude.numel():
            slots = slots[~torch.isin(slots, exclude)]
        take = min(slots.numel(), max(need, self.spec.max_rows // 64))
        if take <= 0:
            return
        if take < slots.numel():
            order = torch.argsort(self.ids[slots], stable=True)
            slots = slots[order]
            slots = slots[torch.argsort(self.touched[slots], stable=True)[:take]]
        self._evict(slots, "rows_evicted_cap")

    def _step(self, slots: torch.Tensor, g: torch.Tensor, hp: dict[str, Any]) -> None:
        """The optimizer's update of rows ``slots`` with gradient rows ``g``, as torch's sparse path computes it."""
        kind, lr, values = self.spec.optimizer, float(hp["lr"]), self.values
        if kind == "sgd":
            _add(values, slots, g, -lr)
        elif kind == "adagrad":
            clr = lr / (1 + (self.steps - 1) * hp["lr_decay"])
            total = _gather(self.state["sum"], slots).add_(g.pow(2))
            _scatter(self.state["sum"], slots, total)
            std = total.sqrt_().add_(hp["eps"])
            _add(values, slots, g / std, -clr)
        elif kind == "rowwise_adagrad":
            total = _gather(self.state["sum"], slots).add_(g.pow(2).mean(dim=1))
            _scatter(self.state["sum"], slots, total)
            std = total.sqrt_().add_(hp["eps"])
            _add(values, slots, g / std[:, None], -lr)
        else:  # sparse_adam
            beta1, beta2 = hp["betas"]
            old_avg = _gather(self.state["exp_avg"], slots)
            avg_update = g.sub(old_avg).mul_(1 - beta1)
            _scatter(self.state["exp_avg"], slots, old_avg + avg_update)
            old_sq = _gather(self.state["exp_avg_sq"], slots)
            sq_update = g.pow(2).sub_(old_sq).mul_(1 - beta2)
            _scatter(self.state["exp_avg_sq"], slots, old_sq + sq_update)
            numer = avg_update.add_(old_avg)
            denom = sq_update.add_(old_sq).sqrt_().add_(hp["eps"])
            step_size = lr * math.sqrt(1 - beta2 ** self.steps) / (1 - beta1 ** self.steps)
            values.index_add_(0, slots, -step_size * numer.div_(denom))

    # -- checkpoints -----------------------------------------------------------------------------------
    def export(self, keep: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The stored rows (sorted by id; ``keep``: a mask over them, by id order) as tensors -- ``ids``,
        ``values``, ``touched``, ``state.<name>`` and the admission ``sketch`` -- and the scalars (copies)."""
        ids, slots = self.index.items()
        order = torch.argsort(ids)
        ids, slots = ids[order], slots[order]
        if keep is not None:
            ids, slots = ids[keep], slots[keep]
        tensors = {"ids": ids.clone(), "values": self.values.index_select(0, slots),
                   "touched": self.touched.index_select(0, slots)}
        for name, tensor in self.state.items():
            tensors[f"state.{name}"] = tensor.index_select(0, slots)
        if self.sketch is not None:
            tensors["sketch"] = self.sketch.clone()
        return tensors, {"steps": self.steps, "clock": self.clock, "counters": dict(self.counters)}

    def load(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Take rows (:meth:`export`'s, possibly several stores' merged and filtered) into an empty store."""
        ids = tensors["ids"]
        n = ids.numel()
        self._grow(max(n, 1024))
        slots = torch.arange(n)
        self.size = n
        self.index.insert(ids, slots)
        self.ids[:n] = ids
        self.values[:n] = tensors["values"]
        self.touched[:n] = tensors["touched"]
        for name, tensor in self.state.items():
            tensor[:n] = tensors[f"state.{name}"]
        if self.spec.admit > 1 and "sketch" in tensors:
            self.sketch = self._new_sketch()
            self.sketch.copy_(tensors["sketch"])
        self.steps, self.clock = int(meta["steps"]), int(meta["clock"])

    def rows(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(id, values) of every stored row (tests, small tables)."""
        ids, slots = self.index.items()
        for i, s in zip(ids.tolist(), slots.tolist(), strict=True):
            yield i, self.values[s]
