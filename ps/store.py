"""The shard store: one float32 tensor per chunk key, the bookkeeping of who pushed what, and the optimizers.

One torch.optim optimizer per worker param group holds every key of that group. Keys that become ready together
(all keys of a message, typically) are stepped by one ``step()`` call with their gradients set and every other
key's gradient None, which torch skips: per-key optimizer state stays exact while the foreach implementation runs
over all of them at once.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


@dataclass
class KeyState:
    """Everything the server holds for one chunk key."""

    key: int
    numel: int
    name: str = ""
    offset: int = 0
    group: int = 0  # the worker optimizer's param group this key belongs to
    home: int = 0  # the server the plan gives it (--replicas: its copies follow from it, zps.protocol.replicas)
    param: torch.Tensor | None = None  # None until rank 0 initialised it
    # BSP with workers replaced by rank: the values one version back, so a replacement that starts a step some keys
    # already applied computes its gradient from the values that step began with (None: not kept, or unknown)
    before: torch.Tensor | None = None
    version: int = 0  # number of updates applied (BSP: the step being aggregated)
    # the hyper-parameters of the update being applied (those of its group that differ from how the optimizer
    # was built: zps.protocol.bodies), and of the latest one otherwise
    hp: dict[str, Any] | None = None
    # BSP aggregation of the current step, summed in rank order (the same bits whatever order pushes arrive in)
    acc: torch.Tensor | None = None
    pushed: set[int] = field(default_factory=set)  # workers that contributed to this step (a gradient or none)
    summed: int = -1  # the highest rank added into ``acc``
    waiting: dict[int, torch.Tensor | None] = field(default_factory=dict)  # came before a lower rank's: held back
    with_grad: int = 0  # contributions added that had a gradient
    step_hp: tuple[int, dict[str, Any] | None] | None = None  # (rank, hp) of the step's lowest-ranked push
    hold: bool = False  # a push of this step asked to hold the aggregate until a commit (zps.protocol.bodies)
    held: Aggregate | None = None  # the step's complete aggregate, held until its commit
    stats: dict[Any, Any] = field(default_factory=dict)  # what inspects computed of a held step (by norm order)
    stats_step: int = -1  # the step ``stats`` describe (kept after its commit, for an inspect that comes late)
    # ASP/SSP: last step applied per worker, so a retried push is applied once
    last_step: dict[int, int] = field(default_factory=dict)

    @property
    def initialized(self) -> bool:
        return self.param is not None

    def label(self) -> str:
        """How messages name this key: ``key 3 ('fc.weight' [0:1024])`` (computed once)."""
        label = self.__dict__.get("_label")
        if label is None:
            where = f" [{self.offset}:{self.offset + self.numel}]"
            label = f"key {self.key} ({self.name!r}{where})" if self.name else f"key {self.key}"
            self.__dict__["_label"] = label
        return label

    def contribute(self, worker: int, grad: torch.Tensor | None, hp: dict[str, Any] | None, order: Iterable[int],
                   owned: bool = True) -> None:
        """BSP: take one worker's push of the current step (None: it had no gradient), then add into the sum every
        contribution whose turn has come: ranks in ascending ``order`` (the workers this step counts), each once
        every lower rank was added. A contribution that comes early waits (a copy, unless ``owned``: the tensor is
        the server's to keep), so the sum is the same whatever order pushes arrive in; at most one waits per
        worker."""
        self.pushed.add(worker)
        if self.step_hp is None or worker < self.step_hp[0]:
            self.step_hp = (worker, hp)
        if list(order) == [worker]:  # --bsp-sum arrival: added as it comes
            self.summed = -1
        self.waiting[worker] = grad if grad is None or owned else grad.clone()
        self.drain(order)

    def drain(self, order: Iterable[int]) -> None:
        """Add the waiting contributions whose turn has come (see :meth:`contribute`)."""
        for rank in sorted(order):
            if rank <= self.summed:
                continue
            if rank not in self.waiting:
                return
            grad = self.waiting.pop(rank)
            self.summed = rank
            if grad is None:
                continue
            if self.with_grad == 0:
                if self.acc is None:
                    self.acc = torch.empty(self.numel, dtype=torch.float32)
                self.acc.copy_(grad)
            else:
                assert self.acc is not None
                self.acc.add_(grad)
            self.with_grad += 1

    def take_aggregate(self) -> Aggregate:
        """BSP: the step's average (None: no worker had a gradient) and hyper-parameters; ready for the next step."""
        assert self.pushed and not self.waiting, "a step is taken once every contribution was added"
        grad = self.acc.div_(len(self.pushed)) if self.with_grad and self.acc is not None else None
        found = Aggregate(grad, self.step_hp[1] if self.step_hp is not None else None, self.hold)
        self.pushed.clear()
        self.summed, self.with_grad, self.step_hp, self.hold = -1, 0, None, False
        return found


class Aggregate(NamedTuple):
    """An update to apply: the gradient (None: no worker had one, so the key is not stepped, only versioned), the
    hyper-parameters it is applied with, and whether it waits for its step's commit (zps.protocol.bodies)."""

    grad: torch.Tensor | None
    hp: dict[str, Any] | None
    hold: bool = False


Update = tuple[KeyState, torch.Tensor | None]  # a key and the gradient to apply to it (None: version it only)
_FOREACH_MAX_ELEMENTS = 1 << 20


def _hp_key(hp: dict[str, Any] | None) -> tuple[Any, ...]:
    if not hp:
        return ()
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in hp.items()))


class Optimizers:
    """The server's torch.optim optimizers, one per worker param group, built from the workers' description."""

    def __init__(self, keep_before: bool = False) -> None:
        """``keep_before``: keep each key's values one version back (:attr:`KeyState.before`)."""
        self.keep_before = keep_before
        self.by_group: dict[int, torch.optim.Optimizer] = {}
        self._built: dict[int, dict[str, Any]] = {}  # each group's settings as built (what ``hp`` overrides)

    def add(self, state: KeyState, param: torch.Tensor, build: Callable[[torch.Tensor], torch.optim.Optimizer]) -> None:
        """Give ``state`` its values and put them under its group's optimizer (built by ``build`` the first time)."""
        optimizer = self.by_group.get(state.group)
        if optimizer is None:
            optimizer = self.by_group[state.group] = build(param)
            self._built[state.group] = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        else:
            optimizer.param_groups[0]["params"].append(param)
        state.param = param

    def built(self, group: int) -> dict[str, Any]:
        """The settings group ``group``'s optimizer was built with."""
        return self._built[group]

    def apply(self, updates: list[Update]) -> None:
        """One optimizer step per (group, hyper-parameters) over every key in ``updates`` with a gradient (torch
        skips a parameter whose gradient is None, and so does this); bumps every key's version."""
        batches: dict[tuple[int, tuple[Any, ...]], list[tuple[KeyState, torch.Tensor]]] = {}
        for state, grad in updates:
            if grad is not None:
                batches.setdefault((state.group, _hp_key(state.hp)), []).append((state, grad))
        if self.keep_before:
            for state, _ in updates:
                assert state.param is not None
                if state.before is None:
                    state.before = state.param.detach().clone()
                else:
                    state.before.copy_(state.param)
        for (group, _), batch in batches.items():
            self._step(group, batch)
        for state, _ in updates:  # only an update that was applied counts (a retry of one that failed is not a
            state.version += 1  # duplicate)

    def _step(self, group: int, batch: list[tuple[KeyState, torch.Tensor]]) -> None:
        optimizer = self.by_group[group]
        settings = optimizer.param_groups[0]
        built = self._built[group]
        settings.update(built)
        for name, value in (batch[0][0].hp or {}).items():
            settings[name] = tuple(value) if isinstance(value, list) and isinstance(built.get(name), tuple) else value
        if "foreach" in settings:
            # foreach saves per-tensor overhead on many small keys, but its temporaries span the whole batch
            settings["foreach"] = len(batch) > 1 and sum(s.numel for s, _ in batch) < _FOREACH_MAX_ELEMENTS
        for state, grad in batch:
            assert state.param is not None
            state.param.grad = grad
        try:
            optimizer.step()
        finally:
            for state, _ in batch:
                state.param.grad = None  # type: ignore[union-attr]
