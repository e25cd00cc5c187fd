"""The high-level wrapper: the user's own torch.optim optimizer, stepped on the parameter servers.

    opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    loss.backward(); opt.step(); opt.zero_grad()

The wrapped optimizer is never stepped locally: its class and per-group hyper-parameters configure the
servers' torch.optim over the shards, and each group's learning rate is sent with every step, so a torch LR
scheduler attached to the *wrapped* optimizer drives the servers. Rank 0's parameter values initialise the
servers; every worker (rank 0 too) then starts from what it pulls, so all begin identical.

With ``overlap=True`` (the default for models on a GPU) each gradient is pushed during backward, as soon as it is accumulated
(post-accumulate-grad hooks, gathered into buckets of ``bucket_bytes``), and :meth:`step` only pushes what is
left and pulls the new values, front layers first. A gradient changed after it was pushed (e.g. clipped between
backward and step) is detected and refused rather than silently ignored: use ``overlap=False`` for that.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Iterable

import torch

from zps.protocol.optim_spec import describe_optimizer

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
        overlap: bool | None = None,
        backward_passes_per_step: int = 1,
        bucket_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        self.optimizer = optimizer
        self.client = client or default_client()
        self.backward_passes_per_step = backward_passes_per_step
        self.bucket_bytes = bucket_bytes
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
        if overlap is None:
            # On a GPU, backward runs on the device while the CPU sends; on a CPU-only host both compete for the
            # same cores, and measured on 2 cores overlap was 0.90-1.05x of no overlap (benchmarks/RESULTS.md).
            overlap = any(p.is_cuda for p in self.params.values())
        self.overlap = overlap
        self.client.declare(self.params, describe_optimizer(optimizer), groups)
        self.client.pull(self.params, step=0).result()
        self.steps = 0
        # overlap bookkeeping, reset every step
        self._name_of = {id(p): n for n, p in self.params.items()}
        self._passes: dict[str, int] = {}
        self._pushed: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (grad pushed, its version then)
        self._bucket: dict[str, torch.Tensor] = {}
        self._bucket_size = 0
        self._futures: list[Future] = []
        self._hooks = []
        if overlap:
            for param in self.params.values():
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad_ready))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def _grads(self, skip: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Each parameter's gradient (zeros where it has none), except the names in ``skip``."""
        return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.params.items() if not skip or n not in skip}

    # -- overlap ---------------------------------------------------------------------------------------
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        name = self._name_of[id(param)]
        count = self._passes.get(name, 0) + 1
        self._passes[name] = count
        if count < self.backward_passes_per_step or name in self._pushed or param.grad is None:
            return
        self._pushed[name] = (param.grad, param.grad._version)
        self._bucket[name] = param.grad
        self._bucket_size += param.grad.numel() * param.grad.element_size()
        if self._bucket_size >= self.bucket_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._bucket:
            self._futures.append(self.client.push(self._bucket, self.steps, lr=self._lrs()))
            self._bucket, self._bucket_size = {}, 0

    def _check_unchanged(self) -> None:
        for name, (grad, version) in self._pushed.items():
            now = self.params[name].grad
            if now is not grad or grad._version != version:
                raise RuntimeError(
                    f"the gradient of {name!r} changed after it was pushed during backward (clipped or rescaled "
                    "between backward and step?); build the DistributedOptimizer with overlap=False to modify "
                    "gradients before they are sent"
                )

    # -- step ------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Push this step's gradients (zeros for parameters without one), pull the new values into the model."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            if self._futures:  # buckets left during backward: push the rest, then pull, front layers first
                self._check_unchanged()  # only what already left can be stale
                self._bucket.update(self._grads(skip=self._pushed))
                self._flush()
                pull = self.client.pull(self.params, self.steps + 1)
                for future in self._futures:
                    future.result()
                pull.result()
            else:  # nothing left early (no overlap, or a model smaller than one bucket): one round trip
                self.client.push_pull(self._grads(), self.params, self.steps, lr=self._lrs()).result()
            self._futures, self._pushed, self._passes, self._bucket, self._bucket_size = [], {}, {}, {}, 0
        self.steps += 1
        # The wrapped optimizer's step() never runs; tell torch's LR schedulers that a step happened.
        self.optimizer._opt_called = True  # type: ignore[attr-defined]
        return loss

    def close(self) -> None:
        """Remove the gradient hooks (the servers keep the model)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
