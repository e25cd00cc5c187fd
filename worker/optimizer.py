"""The high-level wrapper: the user's own torch.optim optimizer, stepped on the parameter servers.

    opt = zps.worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    loss.backward(); opt.step(); opt.zero_grad()

The result is a :class:`torch.optim.Optimizer` -- an instance of a subclass of the wrapped optimizer's own class
(``DistributedSGD`` here; Horovod's wrapper does the same) sharing its param groups -- so torch's LR schedulers,
``isinstance`` checks and ``state_dict()`` work on it. It is never stepped locally: its class and per-group
hyper-parameters configure the servers' torch.optim over the shards, and each group's learning rate is sent with
every step, so a scheduler attached to it (or to the wrapped optimizer) drives the servers. Rank 0's parameter
values initialise the servers; every worker (rank 0 too) then starts from what it pulls, so all begin identical.

With ``overlap=True`` (the default for models on a GPU) each gradient is pushed during backward, as soon as it is
accumulated (post-accumulate-grad hooks, gathered into buckets of ``bucket_bytes``), and :meth:`step` only pushes
what is left and pulls the new values, front layers first. A gradient changed after it was pushed (e.g. clipped
between backward and step) is detected and refused rather than silently ignored: use ``overlap=False`` for that.

In ASP and SSP each worker's copy trails the servers' model; :meth:`DistributedOptimizer.synchronize` waits for
every worker and pulls the servers' values, so what a script saves or evaluates at the end is the servers' model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from zps.protocol import checkpoint as ckpt
from zps.protocol.codecs import ErrorFeedback
from zps.protocol.optim_spec import build_from_spec, describe_optimizer

from ._checkpoint import WorkerCheckpoints, load_part
from .client import Client
from .session import default_client

_SUBCLASSES: dict[type[torch.optim.Optimizer], type[DistributedOptimizer]] = {}


def _subclass(cls: type[torch.optim.Optimizer]) -> type[DistributedOptimizer]:
    """``Distributed<Cls>``: DistributedOptimizer's methods first, then the wrapped optimizer's class (one per class,
    made on first use)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"Distributed{cls.__name__}", (DistributedOptimizer, cls), {"__module__": __name__})
        _SUBCLASSES[cls] = sub
    return sub


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; :meth:`step` pushes every gradient and pulls the updated parameters in place.

    ``model`` (or ``named_parameters``) names the parameters; ``client`` defaults to the process's
    (:func:`zps.worker.init`). See the module docstring for ``overlap``.
    """

    def __new__(cls, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> DistributedOptimizer:
        if cls is DistributedOptimizer:  # an instance of Distributed<Cls>, whose __init__ is the one below
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
            if isinstance(optimizer, DistributedOptimizer):
                raise TypeError("this optimizer is already a DistributedOptimizer")
            cls = _subclass(type(optimizer))
        return object.__new__(cls)

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: torch.nn.Module | None = None,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
        client: Client | None = None,
        overlap: bool | None = None,
        backward_passes_per_step: int = 1,
        bucket_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        # the same param group dicts as ``optimizer``: a scheduler on either drives both
        torch.optim.Optimizer.__init__(self, optimizer.param_groups, optimizer.defaults)
        self.inner = optimizer
        self.client = client or default_client()
        self.backward_passes_per_step = backward_passes_per_step
        self.bucket_bytes = bucket_bytes
        group_of = {id(p): g for g, group in enumerate(self.param_groups) for p in group["params"]}
        if named_parameters is None and model is not None:
            named_parameters = model.named_parameters()
        if named_parameters is None:
            everything = (p for g in self.param_groups for p in g["params"])
            named_parameters = ((f"param.{i}", p) for i, p in enumerate(everything))
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
        # the values of the step this worker starts at: 0, or a replacement's, a resumed job's or a joiner's
        self.client.pull(self.params, step=self.client.start_step).result()
        self.steps = self.client.start_step
        self._synchronized = 0
        self.checkpoints = WorkerCheckpoints(self.client, self.client.config)
        self.resumed: dict[str, Any] | None = None  # the script's state from the checkpoint this job resumed from
        if self.client.config.job.resume:
            self._resume(self.client.config.job.resume)
        self._checkpoint_at = self.checkpoints.due(self.steps)  # asked for with the pushes of the coming step
        # overlap bookkeeping, reset every step
        self._name_of = {id(p): n for n, p in self.params.items()}
        self._passes: dict[str, int] = {}
        self._pushed: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (grad pushed, its version then)
        self._bucket: dict[str, torch.Tensor] = {}
        self._bucket_size = 0
        self._futures: list[Future] = []
        self._hooks: list[Any] = []
        if overlap:
            for param in self.params.values():
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad_ready))
        if model is not None:  # under --trace: forward and backward spans
            self._hooks.extend(self.client.progress.watch(model, lambda: self.steps))
        self.client.progress.ready()

    def _lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.param_groups]

    def _grads(self, skip: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Each parameter's gradient (zeros where it has none), except the names in ``skip``."""
        return {n: p.grad if p.grad is not None else torch.zeros_like(p)
                for n, p in self.params.items() if not skip or n not in skip}

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
            self._futures.append(self.client.push(self._bucket, self.steps, lr=self._lrs(),
                                                  checkpoint=self._checkpoint_at))
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
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Push this step's gradients (zeros for parameters without one), pull the new values into the model."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        progress = self.client.progress
        progress.step_begin(self.steps)
        with torch.no_grad():
            if self._futures:  # buckets left during backward: push the rest, then pull, front layers first
                self._check_unchanged()  # only what already left can be stale
                self._bucket.update(self._grads(skip=self._pushed))
                self._flush()
                with progress.tracer("pull", step=self.steps):
                    pull = self.client.pull(self.params, self.steps + 1)
                    for future in self._futures:
                        future.result()
                    pull.result()
            else:  # nothing left early (no overlap, or a model smaller than one bucket): one round trip
                with progress.tracer("push_pull", step=self.steps):
                    self.client.push_pull(self._grads(), self.params, self.steps, lr=self._lrs(),
                                          checkpoint=self._checkpoint_at).result()
            self._futures, self._pushed, self._passes, self._bucket, self._bucket_size = [], {}, {}, {}, 0
        progress.step_end(self.steps)
        self.steps += 1
        self.checkpoints.after_step(self.steps, self._synchronized)
        self._checkpoint_at = self.checkpoints.due(self.steps)
        # The wrapped optimizer's step() never runs; tell torch's LR schedulers attached to it that a step happened.
        self.inner._opt_called = True  # type: ignore[attr-defined]
        return loss

    def synchronize(self) -> None:
        """Wait until every live worker got here, then pull the servers' current values into the model.

        Afterwards every worker holds exactly the servers' model, in every mode (in ASP and SSP a worker's own copy
        trails it until then). Every worker must call it the same number of times (it is a barrier).
        """
        for future in self._futures:
            future.result()
        self._synchronized += 1
        self.client.barrier(f"zps-synchronize-{self._synchronized}")
        self.client.pull(self.params, step=0).result()

    # -- checkpoints -----------------------------------------------------------------------------------
    def on_checkpoint(self, state: Callable[[], dict[str, Any]]) -> None:
        """Save what ``state()`` returns -- JSON values (epoch, position in the data) and tensors (RNG states) --
        with this worker's part of every checkpoint; a job resumed from one finds it in :attr:`resumed`."""
        self.checkpoints.script = state

    def _resume(self, resume: str) -> None:
        saved = ckpt.number(resume)
        if saved is not None and self.client.start_step > saved:
            return  # a replacement joining the resumed job later: that checkpoint may be gone (--keep) by now
        found = load_part(resume, self.client.rank)
        if found is None:  # ASP/SSP, this worker had finished: it starts where the servers' clocks say
            return
        meta, residuals, script = found
        if self.client.start_step > int(meta["checkpoint"]):  # a replacement joining the resumed job later on
            return
        self.steps = int(meta["steps"])
        self._synchronized = int(meta.get("synchronized", 0))
        self.checkpoints.saved = int(meta["checkpoint"])
        self._set_residuals(residuals)
        self.resumed = script

    def _set_residuals(self, residuals: dict[int, torch.Tensor]) -> None:
        for key, residual in residuals.items():
            try:
                codec = self.client.push_codec(int(key))
            except KeyError:
                raise ValueError(f"the saved state has a residual for key {key}, which this model does not "
                                 "have") from None
            if not isinstance(codec, ErrorFeedback):
                raise ValueError(f"the saved state has an error-feedback residual for key {key}, but this job does "
                                 "not use error feedback")
            codec.residual = residual.clone()

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict (param groups: learning rates and the rest), plus what this worker holds
        under ``"zps"``: its step count and the error-feedback residual of every compressed key."""
        state = super().state_dict()
        residuals = {key: codec.residual.clone() for key, codec in self.client.codecs().items()
                     if isinstance(codec, ErrorFeedback) and codec.residual is not None}
        state["zps"] = {"steps": self.steps, "synchronized": self._synchronized, "residuals": residuals}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The inverse of :meth:`state_dict` (the servers' own state is theirs to restore)."""
        state_dict = dict(state_dict)
        mine = state_dict.pop("zps", None)
        super().load_state_dict(state_dict)
        self.inner.param_groups = self.param_groups  # shared again: a scheduler on either still drives both
        if mine is not None:
            self.steps = int(mine["steps"])
            self._synchronized = int(mine.get("synchronized", 0))
            self._set_residuals(mine.get("residuals", {}))

    def close(self) -> None:
        """Remove the gradient hooks (the servers keep the model)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def build_optimizer(params: Any, default: str = "sgd:lr=0.01") -> torch.optim.Optimizer:
    """The torch optimizer the job asks for (``zps run --optimizer SPEC``, ``ZPS_OPTIMIZER``) over ``params``;
    ``default`` (a spec) when the job sets none. Wrap it in :class:`DistributedOptimizer` as any other."""
    return build_from_spec(default_client().config.job.optimizer or default, params)
