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
  counters); a row is stored once its estimate reaches ``admit`` (a sketch never undercounts, so no later than its
  ``admit``-th sighting). Expiry (``expire``): rows not updated for that many steps are evicted. ``max_rows``: never
  exceeded; the rows updated least recently (ties: the smaller id) are evicted to make room, at least 1/64 of the
  cap at a time, never one updated in the same step; new rows beyond what fits are dropped.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .tables import TableSpec, initial_rows, mix64

_FIB = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed int64: Fibonacci hashing
EMPTY, DELETED = -1, -2
WINDOW = 8  # places one probe round of the index looks at per id
_OFFSETS = torch.arange(WINDOW)
SKETCH_DEPTH, SKETCH_WIDTH = 4, 1 << 20
COUNTERS = ("rows_created", "rows_admitted", "rows_evicted_expired", "rows_evicted_cap", "rows_dropped",
            "rows_refused", "rows_updated")


class HashIndex:
    """int64 id -> int64 slot, vectorised (see the module docstring)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._alloc(max(1024, 1 << (capacity - 1).bit_length()))
        self.used = 0  # live ids
        self.tombs = 0

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.bits = capacity.bit_length() - 1
        self.keys = torch.zeros(capacity, dtype=torch.int64)
        self.slots = torch.full((capacity,), EMPTY, dtype=torch.int64)

    def _home(self, ids: torch.Tensor) -> torch.Tensor:
        return ((ids * _FIB) >> (64 - self.bits)) & (self.capacity - 1)

    def _window(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The :data:`WINDOW` places from each of ``pos`` on, and their slots (two (m, WINDOW) tensors)."""
        places = (pos.unsqueeze(1) + _OFFSETS) & (self.capacity - 1)
        return places, self.slots.index_select(0, places.view(-1)).view(-1, WINDOW)

    def _find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each id: its place in the table and its slot (-1 and -1 where absent). A probe round looks at a window
        of places per id, so most ids resolve in one."""
        n = ids.numel()
        place_out = torch.full((n,), EMPTY, dtype=torch.int64)
        slot_out = torch.full((n,), EMPTY, dtype=torch.int64)
        if n == 0 or self.used == 0:
            return place_out, slot_out
        pos, which, want = self._home(ids), torch.arange(n), ids
        while True:
            places, slots = self._window(pos)
            match = (slots >= 0) & (self.keys.index_select(0, places.view(-1)).view(-1, WINDOW) == want.unsqueeze(1))
            found = match.any(1)
            if bool(found.any()):
                at = match.to(torch.uint8).argmax(1, keepdim=True)
                rows = which.masked_select(found)
                place_out.index_put_((rows,), places.gather(1, at).squeeze(1).masked_select(found))
                slot_out.index_put_((rows,), slots.gather(1, at).squeeze(1).masked_select(found))
            go = ~found & ~(slots == EMPTY).any(1)
            if not bool(go.any()):
                return place_out, slot_out
            pos = pos.masked_select(go) + WINDOW
            which, want = which.masked_select(go), want.masked_select(go)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The slot of each id, -1 where absent."""
        return self._find(ids)[1]

    def insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Map each of ``ids`` (distinct, none present) to its slot."""
        if ids.numel() == 0:
            return
        if (self.used + self.tombs + ids.numel()) * 10 > self.capacity * 7:
            self._rebuild(self.used + ids.numel())
        pos, want, value = self._home(ids), ids, slots
        while want.numel():
            places, held = self._window(pos)
            free = held < 0
            has = free.any(1)
            first = places.gather(1, free.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)
            fp, fw, fv = first.masked_select(has), want.masked_select(has), value.masked_select(has)
            self.keys.index_put_((fp,), fw)  # several may aim at one place: the one that stays there has it
            won = self.keys.index_select(0, fp) == fw
            wp = fp.masked_select(won)
            self.tombs -= int((self.slots.index_select(0, wp) == DELETED).sum())
            self.slots.index_put_((wp,), fv.masked_select(won))
            lost = ~has
            lost.masked_scatter_(has, ~won)
            # a full window: on past it; beaten to a free place: from that place again
            pos = torch.where(has, first, pos + WINDOW).masked_select(lost)
            want, value = want.masked_select(lost), value.masked_select(lost)
        self.used += ids.numel()

    def remove(self, ids: torch.Tensor) -> None:
        """Forget ``ids`` (each present)."""
        places = self._find(ids)[0]
        self.slots.index_fill_(0, places, DELETED)
        self.used -= ids.numel()
        self.tombs += ids.numel()

    def _rebuild(self, live: int) -> None:
        held = self.slots >= 0
        keys, slots = self.keys[held], self.slots[held]
        capacity = 1024
        while live * 2 > capacity:
            capacity *= 2
        self._alloc(max(capacity, self.capacity if self.tombs * 2 > self.used else 0))
        self.used = self.tombs = 0
        self.insert(keys, slots)

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        held = self.slots >= 0
        return self.keys[held], self.slots[held]

    def nbytes(self) -> int:
        return self.capacity * 16


def _state_names(optimizer: str) -> tuple[str, ...]:
    return {"sgd": (), "adagrad": ("sum",), "rowwise_adagrad": ("sum",), "sparse_adam": ("exp_avg", "exp_avg_sq")
            }[optimizer]


class RowStore:
    """The rows of table ``spec`` one process holds (see the module docstring)."""

    def __init__(self, spec: TableSpec, capacity: int = 1024) -> None:
        self.spec = spec
        self.dim = spec.dim
        self.index = HashIndex(capacity * 2)
        self.capacity = 0
        self.size = 0  # slots handed out (evicted ones are reused first: ``_free``)
        self._free = torch.empty(0, dtype=torch.int64)
        self.ids = torch.empty(0, dtype=torch.int64)
        self.values = torch.empty(0, spec.dim)
        self.touched = torch.empty(0, dtype=torch.int64)  # the step of each slot's latest update
        self.state: dict[str, torch.Tensor] = {}
        self.steps = 0  # optimizer steps taken (SparseAdam's and Adagrad's ``step``)
        self.clock = 0  # the newest step an update was applied at (expiry counts from it)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.sketch = torch.zeros(SKETCH_DEPTH, SKETCH_WIDTH, dtype=torch.int32) if spec.admit > 1 else None
        self._grow(capacity)

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
        for name in _state_names(self.spec.optimizer):
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
        held = slots >= 0
        if bool(held.all()):
            return self.values.index_select(0, slots)
        out = torch.empty(ids.numel(), self.dim)
        if bool(held.any()):
            out[held] = self.values.index_select(0, slots[held])
        out[~held] = initial_rows(self.spec, ids[~held])
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
        new = slots < 0
        if bool(new.any()):
            keep = self._admit(ids, new, sightings)
            if keep is not None:
                ids, grads, slots, new = ids[keep], grads[keep], slots[keep], new[keep]
            slots[new] = self._create(ids[new], exclude=slots[~new])
            placed = slots >= 0
            if not bool(placed.all()):  # refused for the cap
                ids, grads, slots = ids[placed], grads[placed], slots[placed]
        if slots.numel():
            self._step(slots, grads, hp)
            self.touched[slots] = step
        self.counters["rows_updated"] += slots.numel()
        return slots.numel()

    def _admit(self, ids: torch.Tensor, new: torch.Tensor, sightings: torch.Tensor | None) -> torch.Tensor | None:
        """Admission: which rows stay (None: all); the gradients of ids not admitted yet are dropped."""
        if self.sketch is None:
            return None
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
            values.index_add_(0, slots, g, alpha=-lr)
        elif kind == "adagrad":
            clr = lr / (1 + (self.steps - 1) * hp["lr_decay"])
            total = self.state["sum"].index_select(0, slots).add_(g.pow(2))
            self.state["sum"].index_copy_(0, slots, total)
            std = total.sqrt_().add_(hp["eps"])
            values.index_add_(0, slots, g / std, alpha=-clr)
        elif kind == "rowwise_adagrad":
            total = self.state["sum"].index_select(0, slots).add_(g.pow(2).mean(dim=1))
            self.state["sum"].index_copy_(0, slots, total)
            std = total.sqrt_().add_(hp["eps"])
            values.index_add_(0, slots, g / std[:, None], alpha=-lr)
        else:  # sparse_adam
            beta1, beta2 = hp["betas"]
            old_avg = self.state["exp_avg"].index_select(0, slots)
            avg_update = g.sub(old_avg).mul_(1 - beta1)
            self.state["exp_avg"].index_copy_(0, slots, old_avg + avg_update)
            old_sq = self.state["exp_avg_sq"].index_select(0, slots)
            sq_update = g.pow(2).sub_(old_sq).mul_(1 - beta2)
            self.state["exp_avg_sq"].index_copy_(0, slots, old_sq + sq_update)
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
        if self.sketch is not None and "sketch" in tensors:
            self.sketch.copy_(tensors["sketch"])
        self.steps, self.clock = int(meta["steps"]), int(meta["clock"])

    def rows(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(id, values) of every stored row (tests, small tables)."""
        ids, slots = self.index.items()
        for i, s in zip(ids.tolist(), slots.tolist(), strict=True):
            yield i, self.values[s]
