"""The high-level wrapper: the user's own torch.optim optimizer, stepped on the parameter servers.

    opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    loss.backward(); opt.step(); opt.zero_grad()

The wrapped optimizer is never stepped locally: its class and per-group hyper-parameters configure the
servers' torch.optim over the shards, and each group's learning rate is sent with every step, so a torch LR
scheduler attached to the *wrapped* optimizer drives the servers. Rank 0's parameter values initialise the
servers; every worker (rank 0 too) then starts from what it pulls, so all begin identical.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from protocol.optim_spec import describe_optimizer

from .client import Client
from .session import default_client


class DistributedOptimizer:
    """Wraps ``optimizer``; :meth:`step` pushes every gradient and pulls the updated parameters in place."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
        client: Client | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.client = client or default_client()
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        if named_parameters is None and model is not None:
            named_parameters = model.named_parameters()
        if named_parameters is None:
            named_parameters = ((f"param.{i}", p) for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]))
        self.params: dict[str, torch.Tensor] = {}
        groups: dict[str, int] = {}
        for name, param in named_parameters:
            if id(param) in group_of and name not in self.params:
                self.params[name] = param
                groups[name] = group_of[id(param)]
        missing = len(group_of) - len(self.params)
        if missing:
            raise ValueError(f"{missing} parameter(s) of the optimizer are not in the model's named_parameters()")
        self._groups = groups
        self.client.declare(self.params, describe_optimizer(optimizer), groups)
        self.client.pull(self.params, step=0).result()
        self.steps = 0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Push this step's gradients (zeros for parameters without one), pull the new values into the model."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in self.params.items()}
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        with torch.no_grad():
            self.client.push_pull(grads, self.params, self.steps, lr=lrs).result()
        self.steps += 1
        return loss
