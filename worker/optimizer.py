"""The high-level wrapper: the user's own torch.optim optimizer, stepped on the parameter servers.

    opt = zps.worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    loss.backward(); opt.step(); opt.zero_grad()

The result is a :class:`torch.optim.Optimizer` -- an instance of a subclass of the wrapped optimizer's own class
(``DistributedSGD`` here; Horovod's wrapper does the same) sharing its param groups -- so torch's LR schedulers,
``isinstance`` checks and ``state_dict()`` work on it. It is never stepped locally: its class and per-group
hyper-parameters configure the servers' torch.optim over the shards. Every hyper-parameter of a group that differs
from what the optimizer was built with (a scheduler's learning rate, OneCycleLR's betas or momentum, the script's
own weight-decay ramp) reaches the servers for the step in which it changed; nothing is sent while nothing differs.
Rank 0's parameter values initialise the servers; every worker (rank 0 too) then starts from what it pulls.

What a training loop does between backward and step has DDP's meaning in BSP (docs/fidelity.md):

* a parameter that no worker produced a gradient for is not stepped (torch skips a ``None`` gradient); one that
  only some workers produced counts as zeros from the others, as DDP's ``find_unused_parameters`` does;
* :meth:`clip_grad_norm_` clips the step's aggregate by its global norm over every shard (torch's
  ``clip_grad_norm_`` on the local gradients keeps its local meaning, and zps says so once);
* a ``torch.amp.GradScaler`` skips a step on every worker when the aggregate holds an inf or NaN, and every
  worker's scale follows the aggregate;
* :meth:`no_sync` accumulates gradients without sending them, as ``DistributedDataParallel.no_sync``.

With ``overlap=True`` (the default for models on a GPU) each gradient is pushed during backward, as soon as it is
accumulated (post-accumulate-grad hooks, gathered into buckets of ``bucket_bytes``), from the second step on: the
first step shows whether the script changes gradients between backward and step (then every step sends them at
step time, and zps logs why once).

In ASP and SSP each worker's copy trails the servers' model; :meth:`DistributedOptimizer.synchronize` waits for
every worker and pulls the servers' values, so what a script saves or evaluates at the end is the servers' model.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from zps.protocol import checkpoint as ckpt
from zps.protocol.bodies import Commit
from zps.protocol.codecs import ErrorFeedback
from zps.protocol.optim_spec import build_from_spec, describe_optimizer, hyperparameter_overrides, refuse_optimizer

from . import _iteration, _state
from ._checkpoint import Resumed, WorkerCheckpoints, load_part
from .client import Client
from .local import LocalClient
from .session import default_client

log = logging.getLogger("zps.worker")
_SUBCLASSES: dict[type[torch.optim.Optimizer], type[DistributedOptimizer]] = {}
# torch's GradScaler hands itself to an optimizer whose step() takes ``grad_scaler`` (and warns that it may stop):
# zps needs it, to make every worker's scale follow the aggregate's infs rather than its own gradients'
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _subclass(cls: type[torch.optim.Optimizer]) -> type[DistributedOptimizer]:
    """``Distributed<Cls>``: DistributedOptimizer's methods first, then the wrapped optimizer's class (one per class,
    made on first use)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"Distributed{cls.__name__}", (DistributedOptimizer, cls), {"__module__": __name__})
        _SUBCLASSES[cls] = sub
    return sub


@dataclass
class _Inspected:
    """The servers' word on a step's aggregate: each parameter's norm (None: no worker produced a gradient for
    it) and whether every element is finite."""

    norms: dict[str, torch.Tensor | None]
    finite: bool
    norm_type: float | None


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer``; :meth:`step` pushes every gradient and pulls the updated parameters in place.

    ``model`` (or ``named_parameters``) names the parameters (and gives the buffers a checkpoint keeps); ``client``
    defaults to the process's (:func:`zps.worker.init`). See the module docstring for ``overlap``.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler passes itself to step(): see _scaler_step

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
        refuse_optimizer(type(optimizer))
        if model is not None:
            _refuse_sparse(model)
        # the same param group dicts as ``optimizer``: a scheduler on either drives both
        self._building = True
        torch.optim.Optimizer.__init__(self, optimizer.param_groups, optimizer.defaults)
        self._building = False
        self.inner = optimizer
        self.client = client or default_client()
        self.model = model
        self._local = isinstance(self.client, LocalClient)  # no launcher: the wrapped optimizer steps here
        self._steps = self._synchronized = 0
        self._steps_read = False
        self._resumed: dict[str, Any] | None = None  # the script's state from the checkpoint this job resumed from
        self._hooks: list[Any] = []
        self._clip: tuple[float, torch.Tensor] | None = None  # (max_norm, the clip coefficient), asked this step
        self._no_sync = False
        self.checkpoints: WorkerCheckpoints | None = None
        if self._local:
            return
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
        named: set[int] = set()  # a parameter shared by two modules (tied weights) is one key, named once
        for name, param in named_parameters:
            if id(param) in group_of and name not in self.params and id(param) not in named:
                self.params[name] = param
                groups[name] = group_of[id(param)]
                named.add(id(param))
        missing = len(group_of) - len(self.params)
        if missing:
            raise ValueError(f"{missing} parameter(s) of the optimizer are not in the model's named_parameters()")
        if overlap is None:
            # On a GPU, backward runs on the device while the CPU sends; on a CPU-only host both compete for the
            # same cores, and measured on 2 cores overlap was 0.90-1.05x of no overlap (benchmarks/RESULTS.md).
            overlap = any(p.is_cuda for p in self.params.values())
        self.overlap = overlap
        self._bsp = self.client.topology.mode == "bsp"
        # pulled into a contiguous float32 copy first, then copied in (the servers hold float32 master values)
        self._staging = {n: torch.empty(p.numel(), dtype=torch.float32, device=p.device)
                         for n, p in self.params.items() if p.dtype != torch.float32 or not p.is_contiguous()}
        self._declared = describe_optimizer(optimizer)
        self.client.declare(self.params, self._declared, groups)
        # the values of the step this worker starts at: 0, or a replacement's, a resumed job's or a joiner's
        self._pull(self.client.start_step).result()
        self._copy_staged()
        self._steps = self.client.start_step
        checkpoints = self.checkpoints = WorkerCheckpoints(self.client, self.client.config, lambda: self.param_groups,
                                                           model)
        self._restore: Resumed | None = None  # the rest of it, restored where the iteration it was taken at ends
        if self.client.config.job.resume:
            self._resume(self.client.config.job.resume)
        self._checkpoint_at = checkpoints.due(self._steps)  # asked for with the pushes of the coming step
        # per-step bookkeeping
        self._name_of = {id(p): n for n, p in self.params.items()}
        self._passes: dict[str, int] = {}
        self._seen: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (its gradient, that gradient's version)
        self._pushed: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (grad pushed, its version then)
        self._bucket: dict[str, torch.Tensor | None] = {}
        self._bucket_size = 0
        self._futures: list[Future] = []
        self._inspected: _Inspected | None = None
        self._early = False  # push during backward this step (overlap, learned from the first step)
        self._early_off: str | None = None  # why overlap stays off
        self._said: set[str] = set()
        self._hooked: set[str] = set()
        self._hook_new()
        if model is not None:  # under --trace: forward and backward spans
            self._hooks.extend(self.client.progress.watch(model, lambda: self._steps))
        _iteration.set_handler(self._sampler_draws, self._sampler_created)
        for sampler in _iteration.samplers():
            self._sampler_created(sampler)
        self.client.before_close.append(self._ending)
        self.client.progress.ready()

    # -- what the script reads ---------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Steps done: the job's step this worker is at (a resumed job's counts from its checkpoint)."""
        self._steps_read = True
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = int(value)

    @property
    def resumed(self) -> dict[str, Any] | None:
        """What the script gave :meth:`on_checkpoint` in the checkpoint this job resumed from (None: a fresh job)."""
        self._steps_read = True
        return self._resumed

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_building", True):
            names = ", ".join(str(tuple(p.shape)) for p in param_group.get("params", [])[:3])
            raise ValueError(f"add_param_group after the DistributedOptimizer was built (parameters of shape {names}):"
                             " the servers hold the parameters declared when it was built; put every group in the "
                             "torch optimizer before wrapping it (a group may start with lr=0)")
        super().add_param_group(param_group)

    # -- gradients as backward produces them -----------------------------------------------------------
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        name = self._name_of[id(param)]
        grad = param.grad
        if grad is None:
            return
        self._seen[name] = (grad, grad._version)
        if not self._early or self._no_sync:
            return
        count = self._passes.get(name, 0) + 1
        self._passes[name] = count
        if count < self.backward_passes_per_step or name in self._pushed:
            return
        self._pushed[name] = (grad, grad._version)
        self._bucket[name] = grad
        self._bucket_size += grad.numel() * grad.element_size()
        if self._bucket_size >= self.bucket_bytes:
            self._flush()

    def _hook_new(self) -> None:
        """Watch every parameter that takes gradients (one frozen so far gets its hook once it is unfrozen)."""
        for name, param in self.params.items():
            if param.requires_grad and name not in self._hooked:
                self._hooked.add(name)
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad_ready))

    def _flush(self, hold: bool | None = None) -> None:
        if self._bucket:
            hold = self._bsp if hold is None else hold  # BSP: applied when the step's commit comes
            self._futures.append(self.client.push(self._bucket, self._steps, lr=self._lrs(), hold=hold,
                                                  hp=None if hold else self._hp(), checkpoint=self._checkpoint_at))
            self._bucket, self._bucket_size = {}, 0

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients locally and send nothing (``DistributedDataParallel.no_sync``);
        the first backward after it sends the accumulated gradients."""
        self._no_sync = True
        try:
            yield
        finally:
            self._no_sync = False

    def _lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.param_groups]

    def _hp(self) -> list[dict[str, Any]] | None:
        """Each group's hyper-parameters that differ from those the servers' optimizer was built with (None: none)."""
        return hyperparameter_overrides(self._declared, self.param_groups)

    def _grads(self, skip: dict[str, Any] | None = None) -> dict[str, torch.Tensor | None]:
        """Each parameter's gradient (None where it has none), except the names in ``skip``."""
        out: dict[str, torch.Tensor | None] = {}
        for n, p in self.params.items():
            if skip and n in skip:
                continue
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"{n!r} has a sparse gradient: a DistributedOptimizer sends dense gradients; a table "
                                 "held by rows on the servers is zps.worker.EmbeddingTable (or use sparse=False)")
            out[n] = p.grad
        return out

    def _changed_after_backward(self) -> dict[str, int]:
        """Parameters whose gradient was changed in place since backward produced it, with how many times."""
        changed = {}
        for name, (grad, version) in self._seen.items():
            now = self.params[name].grad
            if now is grad and grad._version != version:
                changed[name] = grad._version - version
            elif now is not grad and now is not None:
                changed[name] = 1
        return changed

    def _check_unchanged(self) -> None:
        for name, (grad, version) in self._pushed.items():
            now = self.params[name].grad
            if now is not grad or grad._version != version:
                raise RuntimeError(
                    f"the gradient of {name!r} changed after zps sent it (during backward, or in clip_grad_norm_): "
                    "change gradients before opt.clip_grad_norm_, use opt.clip_grad_norm_ rather than torch's, or "
                    "build the DistributedOptimizer with overlap=False"
                )

    def _say_once(self, what: str, message: str) -> None:
        if what not in self._said:
            self._said.add(what)
            log.warning("%s: %s", self.client.name, message)

    # -- clipping --------------------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """Clip this step's gradient by its global norm with DDP's meaning, and return that norm.

        BSP: the norm is that of the step's aggregate (every worker's gradient averaged) over every shard of every
        server, as ``torch.nn.utils.clip_grad_norm_`` computes it after DDP's all-reduce; the gradients are sent
        now and the servers scale the aggregate by the clip coefficient in :meth:`step`. Call it where the script
        called torch's (after backward, before step; under a GradScaler, after ``scaler.unscale_(opt)``). ASP and
        SSP have no step aggregate: each worker's own gradient is clipped, as torch's function does.
        """
        if self._local or not self._bsp:
            params = [p for g in self.param_groups for p in g["params"]]
            return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
        if self._clip is not None:
            raise RuntimeError("clip_grad_norm_ was already called in this step")
        norm_type = float(norm_type)
        inspected = self._inspect(norm_type)
        norms = [n for n in inspected.norms.values() if n is not None]
        total = (torch.linalg.vector_norm(torch.stack(norms), norm_type) if norms
                 else torch.tensor(0.0))
        if error_if_nonfinite and (total.isnan() or total.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
                "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
                "`error_if_nonfinite=False`")
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
        self._clip = (float(max_norm), coef)
        return total

    def _inspect(self, norm_type: float | None) -> _Inspected:
        """Send what backward left, held (BSP), and ask the servers for the aggregate's norms and finiteness."""
        if self._inspected is not None and (norm_type is None or self._inspected.norm_type == norm_type):
            return self._inspected
        self._check_unchanged()
        self._bucket.update(self._grads(skip=self._pushed))
        self._pushed.update({n: (g, g._version) for n, g in self._bucket.items() if g is not None})
        self._flush(hold=True)
        found = self.client.inspect(list(self.params), self._steps, norm_type).result()
        norms: dict[str, torch.Tensor | None] = {}
        finite = True
        for name in self.params:
            parts = [found[c.key] for c in self.client.chunks(name)]
            finite = finite and all(p.finite for p in parts)
            if norm_type is None or all(p.norm is None for p in parts):
                norms[name] = None
                continue
            values = torch.tensor([p.norm if p.norm is not None else 0.0 for p in parts], dtype=torch.float32)
            # a norm of norms is the norm of the whole (p-norms compose); one chunk is the parameter's own norm
            norms[name] = values[0] if len(parts) == 1 else torch.linalg.vector_norm(values, norm_type)
        self._inspected = _Inspected(norms, finite, norm_type)
        return self._inspected

    # -- step ------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], float] | None = None,  # type: ignore[override]
             grad_scaler: torch.amp.GradScaler | None = None) -> float | None:
        """Push this step's gradients, pull the new values into the model (see the module docstring)."""
        if self._local:
            return self._local_step(closure, grad_scaler)
        self._iteration_ended(at_sampler=False)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._steps == self.client.start_step and self.client.start_step > 0:
            self._check_resumed_use()
        progress = self.client.progress
        progress.step_begin(self._steps)
        stage = _scaler_stage(self, grad_scaler)
        changed = self._changed_after_backward()
        expected = 1 if stage == "unscaled" else 0  # scaler.unscale_ changes each gradient once
        if any(times > expected for times in changed.values()):
            what = "opt.clip_grad_norm_(max_norm)" if self._bsp else "it"
            self._say_once("local", f"the script changed gradients between backward and step ({sorted(changed)[0]!r}"
                                    " and others; torch.nn.utils.clip_grad_norm_?): zps sends them as changed, so "
                                    f"that acts on each worker's own gradient, not on the average as under DDP; "
                                    f"{what} clips the average by its global norm")
        with torch.no_grad():
            if self._bsp:
                self._bsp_step(grad_scaler, stage)
            else:
                self._async_step(grad_scaler, stage)
        self._copy_staged()
        self._futures, self._pushed, self._passes, self._bucket, self._bucket_size = [], {}, {}, {}, 0
        self._seen, self._inspected, self._clip = {}, None, None
        self._learn_overlap(changed, grad_scaler)
        if len(self._hooked) < len(self.params):
            self._hook_new()
        progress.step_end(self._steps)
        self._steps += 1
        assert self.checkpoints is not None
        self.checkpoints.after_step(self._steps, self._synchronized)
        self._checkpoint_at = self.checkpoints.due(self._steps)
        # The wrapped optimizer's step() never runs; tell torch's LR schedulers attached to it that a step happened.
        self.inner._opt_called = True  # type: ignore[attr-defined]
        return loss

    def _bsp_step(self, grad_scaler: torch.amp.GradScaler | None, stage: str | None) -> None:
        progress = self.client.progress
        if not (self._futures or self._clip is not None or grad_scaler is not None):
            # nothing left early and nothing to agree on: push and pull in one round trip, applied when complete
            with progress.tracer("push_pull", step=self._steps):
                self.client.push_pull(self._grads(), self._destinations(), self._steps, lr=self._lrs(),
                                      hp=self._hp(), checkpoint=self._checkpoint_at).result()
            return
        # the step's aggregate is held on the servers until this commit says how to apply it
        inspected = self._inspect(None) if grad_scaler is not None else None
        skip = inspected is not None and not inspected.finite
        factors: list[float] = []
        if grad_scaler is not None and stage == "ready":  # DDP: (clip,) then scaler.step unscales, then steps
            if self._clip is not None:
                factors.append(self._clip[1].item())
            factors.append(_inverse_scale(grad_scaler))
        elif self._clip is not None:  # unscaled already (scaler.unscale_ before the clip), or no scaler
            factors.append(self._clip[1].item())
        if grad_scaler is not None:
            _set_found_inf(self, grad_scaler, skip)
        self._check_unchanged()
        self._bucket.update(self._grads(skip=self._pushed))
        self._flush(hold=True)
        commit = Commit(step=self._steps, skip=skip, mul=factors, hp=self._hp())
        with progress.tracer("pull", step=self._steps):
            pull = self._pull(self._steps + 1, commit)
            for future in self._futures:
                future.result()
            pull.result()

    def _async_step(self, grad_scaler: torch.amp.GradScaler | None, stage: str | None) -> None:
        """ASP/SSP: every push is applied as it comes, so a GradScaler and clipping act on this worker's own
        gradient (as torch's do without DDP); a skipped step pushes no gradient."""
        skip = False
        if grad_scaler is not None:
            if stage == "ready":
                grad_scaler.unscale_(self)
            skip = not all(torch.isfinite(g).all() for g in self._grads().values() if g is not None)
        self._check_unchanged()
        grads = self._grads(skip=self._pushed)
        if skip:
            grads = dict.fromkeys(grads)
        with self.client.progress.tracer("push_pull", step=self._steps):
            if self._futures:
                self._bucket.update(grads)
                self._flush()
                pull = self._pull(self._steps + 1)
                for future in self._futures:
                    future.result()
                pull.result()
            else:
                self.client.push_pull(grads, self._destinations(), self._steps, lr=self._lrs(), hp=self._hp(),
                                      checkpoint=self._checkpoint_at).result()

    def _local_step(self, closure: Callable[[], float] | None, grad_scaler: torch.amp.GradScaler | None) -> Any:
        """No launcher: the wrapped optimizer steps here, as torch's GradScaler would step it."""
        loss = None
        if grad_scaler is None:
            loss = self.inner.step(closure)
        else:
            if _scaler_stage(self, grad_scaler) == "ready":
                grad_scaler.unscale_(self)
            found = grad_scaler._per_optimizer_states[id(self)]["found_inf_per_device"]
            if not sum(v.item() for v in found.values()):
                loss = self.inner.step(closure)
        self._steps += 1
        self.inner._opt_called = True  # type: ignore[attr-defined]
        return loss

    def _learn_overlap(self, changed: dict[str, int], grad_scaler: torch.amp.GradScaler | None) -> None:
        """After a step: push during backward from now on, unless this step showed that the script changes
        gradients after backward (they must leave at step time) or, in ASP/SSP, scales them (GradScaler)."""
        if not self.overlap or self._early_off is not None:
            return
        if changed:
            self._early_off = f"the script changes gradients after backward ({sorted(changed)[0]!r})"
        elif grad_scaler is not None and not self._bsp:
            self._early_off = "a GradScaler unscales them at step time (ASP/SSP)"
        if self._early_off is not None:
            self._early = False
            self._say_once("overlap", f"overlap off: gradients are sent at step time, since {self._early_off}")
        else:
            self._early = True

    def _destinations(self) -> dict[str, torch.Tensor]:
        return {n: self._staging.get(n, p) for n, p in self.params.items()}

    def _pull(self, step: int, commit: Commit | None = None) -> Future:
        return self.client.pull(self._destinations(), step, commit=commit)

    def _copy_staged(self) -> None:
        for name, staged in self._staging.items():
            param = self.params[name]
            with torch.no_grad():
                param.copy_(staged.view(param.shape))

    def synchronize(self) -> None:
        """Wait until every live worker got here, then pull the servers' current values into the model.

        Afterwards every worker holds exactly the servers' model, in every mode (in ASP and SSP a worker's own copy
        trails it until then), and rank 0's buffers (BatchNorm statistics: DDP's ``broadcast_buffers``). Every
        worker must call it the same number of times (it is a barrier).
        """
        if self._local:
            return
        self._iteration_ended(at_sampler=False)
        for future in self._futures:
            future.result()
        self._synchronized += 1
        self.client.barrier(f"zps-synchronize-{self._synchronized}")
        self._pull(0).result()
        self._copy_staged()
        if self.model is not None:
            buffers = dict(self.model.named_buffers())
            if buffers:
                self.client.broadcast(buffers, f"zps-buffers-{self._synchronized}")

    # -- checkpoints -----------------------------------------------------------------------------------
    def on_checkpoint(self, state: Callable[[], dict[str, Any]]) -> None:
        """Save what ``state()`` returns -- JSON values (epoch, a scheduler's ``state_dict()``) and tensors -- with
        this worker's part of every checkpoint, at the end of the iteration it is taken in (after the script's own
        code following ``opt.step()``); a job resumed from one finds it in :attr:`resumed`. The optimizer's param
        groups, the model's buffers, the random number generators and the zps samplers' positions are saved
        without asking."""
        if self.checkpoints is not None:
            self.checkpoints.script = state

    def _sampler_draws(self) -> None:
        self._iteration_ended(at_sampler=True)

    def _sampler_created(self, sampler: Any) -> None:
        """A zps sampler of a resumed job continues at its saved position (matched by creation order)."""
        if self._restore is None:
            return
        saved = self._restore.meta.get("samplers", [])
        index = _iteration.samplers().index(sampler)
        if index < len(saved):
            sampler.resume_at = (int(saved[index]["epoch"]), int(saved[index]["position"]))

    def _iteration_ended(self, at_sampler: bool) -> None:
        """An iteration ended: a resumed job takes back the rest of its state here; a due checkpoint is taken."""
        restore = self._restore
        if restore is not None and (at_sampler or not restore.at_sampler or not _iteration.samplers()):
            self._restore = None
            _state.restore_groups(self.param_groups, restore.meta.get("groups", []))
            if restore.at_sampler:
                _state.restore_rng(restore.meta.get("rng", {}), restore.tensors)
                _state.restore_buffers(self.model, restore.tensors)
        if self.checkpoints is not None:
            self.checkpoints.iteration_ended(at_sampler)

    def _ending(self) -> None:
        """The worker ends (shutdown): a checkpoint still due is taken now."""
        self._iteration_ended(at_sampler=False)

    def _resume(self, resume: str) -> None:
        saved = ckpt.number(resume)
        if saved is not None and self.client.start_step > saved:
            return  # a replacement joining the resumed job later: that checkpoint may be gone (--keep) by now
        found = load_part(resume, self.client.rank)
        if found is None:  # ASP/SSP, this worker had finished: it starts where the servers' clocks say
            return
        if self.client.start_step > int(found.meta["checkpoint"]):  # a replacement joining the resumed job later
            return
        self._steps = int(found.meta["steps"])
        self._synchronized = int(found.meta.get("synchronized", 0))
        assert self.checkpoints is not None
        self.checkpoints.saved = int(found.meta["checkpoint"])
        self._set_residuals(found.residuals)
        self._resumed = found.script
        if "groups" in found.meta:  # (a part written before 0.8 holds only the script's state)
            self._restore = found
            if not found.at_sampler:  # taken at a step: its RNG and buffers were those at the end of the step
                _state.restore_rng(found.meta.get("rng", {}), found.tensors)
                _state.restore_buffers(self.model, found.tensors)
        if self.client.rank == 0:
            log.warning("%s: resumed from %s at step %d", self.client.name, resume, self._steps)

    def _check_resumed_use(self) -> None:
        """A resumed job whose script counts its own steps from 0 would train more than the uninterrupted run."""
        if not self._steps_read and not _iteration.samplers():
            self._say_once("resumed", f"this job resumed at step {self._steps}, but the script read neither "
                                      "opt.steps nor opt.resumed and draws no data from a zps sampler: if it counts "
                                      "its steps or epochs from 0, it trains more steps than the uninterrupted run "
                                      "and sees its first batches again (docs/fidelity.md)")

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
        codecs = {} if self._local else self.client.codecs()
        residuals = {key: codec.residual.clone() for key, codec in codecs.items()
                     if isinstance(codec, ErrorFeedback) and codec.residual is not None}
        state["zps"] = {"steps": self._steps, "synchronized": self._synchronized, "residuals": residuals}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The inverse of :meth:`state_dict` (the servers' own state is theirs to restore)."""
        state_dict = dict(state_dict)
        mine = state_dict.pop("zps", None)
        super().load_state_dict(state_dict)
        self.inner.param_groups = self.param_groups  # shared again: a scheduler on either still drives both
        if mine is not None:
            self._steps = int(mine["steps"])
            self._synchronized = int(mine.get("synchronized", 0))
            self._set_residuals(mine.get("residuals", {}))

    def close(self) -> None:
        """Remove the gradient hooks (the servers keep the model)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        _iteration.set_handler(None)


def _refuse_sparse(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and module.sparse:
            raise ValueError(f"{type(module).__name__} {name!r} has sparse=True: a DistributedOptimizer sends dense "
                             "gradients; for a table the servers hold by rows, pulled and pushed by the ids of a "
                             "batch, use zps.worker.EmbeddingTable (or build it with sparse=False)")


def _scaler_stage(optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler | None) -> str | None:
    """Where a GradScaler stepping ``optimizer`` is: "ready" (gradients still scaled) or "unscaled"."""
    if grad_scaler is None:
        return None
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    return "unscaled" if state["stage"].name == "UNSCALED" else "ready"


def _inverse_scale(grad_scaler: torch.amp.GradScaler) -> float:
    """1 / scale, as GradScaler.unscale_ computes it (in float64, then float32)."""
    scale = grad_scaler._scale
    assert scale is not None
    return float(scale.double().reciprocal().float().item())


def _set_found_inf(optimizer: torch.optim.Optimizer, grad_scaler: torch.amp.GradScaler, found: bool) -> None:
    """What the scaler's update() reads: whether this step's aggregate held an inf or NaN (the same on every
    worker), not whether this worker's own gradients did."""
    scale = grad_scaler._scale
    assert scale is not None
    state = grad_scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"] = {scale.device: torch.full((), 1.0 if found else 0.0, dtype=torch.float32,
                                                              device=scale.device)}


def build_optimizer(params: Any, default: str = "sgd:lr=0.01") -> torch.optim.Optimizer:
    """The torch optimizer the job asks for (``zps run --optimizer SPEC``, ``ZPS_OPTIMIZER``) over ``params``;
    ``default`` (a spec) when the job sets none. Wrap it in :class:`DistributedOptimizer` as any other."""
    return build_from_spec(default_client().config.job.optimizer or default, params)


