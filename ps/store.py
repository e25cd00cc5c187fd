"""The shard store: one float32 tensor per chunk key, the bookkeeping of who pushed what, and the optimizers.

One torch.optim optimizer per worker param group holds every key of that group. Keys that become ready together
(all keys of a message, typically) are stepped by one ``step()`` call with their gradients set and every other
key's gradient None, which torch skips: per-key optimizer state stays exact while the foreach implementation runs
over all of them at once.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    version: int = 0  # number of updates applied (BSP: the step being aggregated)
    lr: float | None = None  # latest learning rate a worker sent for this key
    # BSP aggregation of the current step
    acc: torch.Tensor | None = None
    pushed: set[int] = field(default_factory=set)
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

    def accumulate(self, worker: int, grad: torch.Tensor) -> None:
        """BSP: add one worker's gradient to this step's sum (in place; the first push is copied in)."""
        if self.acc is None:
            self.acc = torch.empty(self.numel, dtype=torch.float32)
        if not self.pushed:
            self.acc.copy_(grad)
        else:
            self.acc.add_(grad)
        self.pushed.add(worker)

    def take_aggregate(self) -> torch.Tensor:
        """BSP: the average of the step's pushes, to apply once."""
        assert self.acc is not None and self.pushed
        self.acc.div_(len(self.pushed))
        self.pushed.clear()
        return self.acc



Update = tuple[KeyState, torch.Tensor]  # a key and the gradient to apply to it
_FOREACH_MAX_ELEMENTS = 1 << 20


class Optimizers:
    """The server's torch.optim optimizers, one per worker param group, built from the workers' description."""

    def __init__(self) -> None:
        self.by_group: dict[int, torch.optim.Optimizer] = {}

    def add(self, state: KeyState, param: torch.Tensor, build: Callable[[torch.Tensor], torch.optim.Optimizer]) -> None:
        """Give ``state`` its values and put them under its group's optimizer (built by ``build`` the first time)."""
        optimizer = self.by_group.get(state.group)
        if optimizer is None:
            self.by_group[state.group] = build(param)
        else:
            optimizer.param_groups[0]["params"].append(param)
        state.param = param

    def apply(self, updates: list[Update]) -> None:
        """One optimizer step per (group, learning rate) over every key in ``updates``; bumps their versions."""
        batches: dict[tuple[int, float | None], list[Update]] = {}
        for state, grad in updates:
            batches.setdefault((state.group, state.lr), []).append((state, grad))
        for (group, lr), batch in batches.items():
            optimizer = self.by_group[group]
            settings = optimizer.param_groups[0]
            if lr is not None:
                settings["lr"] = lr
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
            for state, _ in batch:  # only an update that was applied counts (a retry of one that failed is not a
                state.version += 1  # duplicate)
