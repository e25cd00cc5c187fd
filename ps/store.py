"""The shard store: one float32 tensor per chunk key, its optimizer, and the bookkeeping of who pushed what."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class KeyState:
    """Everything the server holds for one chunk key."""

    key: int
    numel: int
    name: str = ""
    offset: int = 0
    group: int = 0  # the worker optimizer's param group this key belongs to
    param: torch.Tensor | None = None  # None until rank 0 initialised it
    optimizer: torch.optim.Optimizer | None = None
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
        where = f" [{self.offset}:{self.offset + self.numel}]" if self.name else ""
        return f"key {self.key} ({self.name!r}{where})" if self.name else f"key {self.key}"

    def initialize(self, values: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.param = values
        self.optimizer = optimizer

    def apply(self, grad: torch.Tensor) -> None:
        """One optimizer step with ``grad`` (float32, flat, same numel) as the gradient."""
        assert self.param is not None and self.optimizer is not None
        if self.lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
        self.param.grad = grad
        self.optimizer.step()
        self.param.grad = None
        self.version += 1

    def accumulate(self, worker: int, grad: torch.Tensor) -> None:
        """BSP: add one worker's gradient to this step's sum (in place; the first push is copied in)."""
        if self.acc is None:
            self.acc = torch.empty(self.numel, dtype=torch.float32)
        if not self.pushed:
            self.acc.copy_(grad)
        else:
            self.acc.add_(grad)
        self.pushed.add(worker)

    def apply_aggregate(self) -> None:
        """BSP: average the step's pushes and apply them once."""
        assert self.acc is not None and self.pushed
        self.acc.div_(len(self.pushed))
        self.pushed.clear()
        self.apply(self.acc)

    def stats(self) -> dict[str, Any]:
        return {"key": self.key, "version": self.version, "initialized": self.initialized}
