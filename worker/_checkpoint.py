"""A worker's side of checkpoints: when to ask for one (worker 0), taking this worker's part at the end of an
iteration, reading it back.

Worker 0 asks for checkpoint V with its push of step V - 1 (every ``--checkpoint-every`` steps, or once that many
seconds passed); the servers pass the request on in their replies, so every worker learns of it when its step
V - 1 ends. Its part is then taken at the end of that iteration (:mod:`._iteration`): its step count, the
error-feedback residual of every compressed key, the optimizer's param groups, the model's buffers, the random
number generators, the zps samplers' positions and what the script gave
:meth:`zps.worker.DistributedOptimizer.on_checkpoint` (JSON values and tensors), all after the script's own code
that followed ``opt.step()``.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from zps.protocol import checkpoint as ckpt
from zps.protocol.codecs import ErrorFeedback
from zps.protocol.config import Config

from . import _iteration, _state
from .client import Client

ScriptState = Callable[[], dict[str, Any]]
log = logging.getLogger("zps.worker")


@dataclass
class _Due:
    """A checkpoint asked for: what the end of its step fixed (the step count; buffers and RNG as they were then,
    used when the iteration's end is seen only at the next step)."""

    checkpoint: int
    steps: int
    synchronized: int
    rng: tuple[dict[str, Any], dict[str, torch.Tensor]]
    buffers: dict[str, torch.Tensor]


@dataclass
class Resumed:
    """A worker's part of the checkpoint a job resumed from."""

    meta: dict[str, Any]
    residuals: dict[int, torch.Tensor]
    script: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def at_sampler(self) -> bool:
        """The part was taken as a zps sampler drew the next sample (its RNG and buffers come back there too)."""
        return self.meta.get("taken_at") == "sampler"


class WorkerCheckpoints:
    """The checkpoints of one worker; ``groups`` gives the optimizer's param groups, ``model`` its buffers."""

    def __init__(self, client: Client, config: Config, groups: Callable[[], list[dict[str, Any]]],
                 model: torch.nn.Module | None) -> None:
        self.client = client
        self.interval = config.job.checkpoint_interval()
        self.root = config.job.checkpoint_dir
        self.saved = 0
        self.last = time.monotonic()
        self.script: ScriptState | None = None
        self.groups = groups
        self.model = model
        self._due: _Due | None = None

    def due(self, steps: int) -> int | None:
        """Worker 0: the checkpoint to ask for with the pushes of step ``steps`` (its id: ``steps + 1``), or None."""
        if self.interval is None or self.client.rank != 0:
            return None
        unit, every = self.interval
        if unit == "steps":
            return steps + 1 if (steps + 1) % int(every) == 0 else None
        if time.monotonic() - self.last >= every:
            self.last = time.monotonic()
            return steps + 1
        return None

    def after_step(self, steps: int, synchronized: int) -> None:
        """A step ended: when a checkpoint was asked for, its part is taken at the end of this iteration."""
        asked = self.client.checkpoint_requested
        if self.interval is None or asked <= self.saved:
            return
        if self.client.topology.mode == "bsp" and asked != steps:  # BSP: checkpoint V is the cut at step V
            if asked > steps:  # (the servers tell of V only in replies to pulls of step V or later)
                log.error("%s: checkpoint %d was asked for at step %d, before its step; it is not taken",
                          self.client.name, asked, steps)
            self.saved = asked  # (one asked before this worker started: a replacement's, a joiner's)
            return
        self.saved = asked
        self._due = _Due(asked, steps, synchronized, _state.rng_state(), _state.buffers(self.model))

    def iteration_ended(self, at_sampler: bool) -> None:
        """The iteration ended (``at_sampler``: a zps sampler draws the next sample): take the part now if due."""
        due, self._due = self._due, None
        if due is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        for key, codec in self.client.codecs().items():
            if isinstance(codec, ErrorFeedback) and codec.residual is not None:
                tensors[f"residual.{key}"] = codec.residual.detach().to("cpu")
        script: dict[str, Any] = {}
        if self.script is not None:
            for name, value in self.script().items():
                if isinstance(value, torch.Tensor):
                    tensors[f"script.{name}"] = value.detach().to("cpu")
                else:
                    script[name] = value
        rng, rng_tensors = _state.rng_state() if at_sampler else due.rng
        tensors.update(rng_tensors)
        tensors.update(_state.buffers(self.model) if at_sampler else due.buffers)
        meta = {"checkpoint": due.checkpoint, "worker": self.client.rank, "steps": due.steps,
                "synchronized": due.synchronized, "script": script, "groups": _state.group_state(self.groups()),
                "rng": rng, "samplers": _state.sampler_state(_iteration.samplers()),
                "taken_at": "sampler" if at_sampler else "step"}
        path = ckpt.directory(self.root, due.checkpoint) / ckpt.part_name("worker", self.client.rank)
        try:
            size = ckpt.save_part(path, tensors, meta)
        except OSError as exc:  # a full disk: this checkpoint stays incomplete, the previous one stays the newest
            log.error("%s: checkpoint %d could not be written to %s: %s; training goes on", self.client.name,
                      due.checkpoint, path, exc)
            return
        info: dict[str, Any] = {"step": due.steps}
        plan = self.client.plan
        if self.client.rank == 0 and plan is not None:  # what the manifest needs to know of the model
            info["params"] = [[p.name, list(p.shape)] for p in plan.params]
            info["servers"] = sorted({c.server for c in plan.chunks} | self.client.table_servers)
        self.client.rendezvous.report_saved(due.checkpoint, path.name, size, info)


def load_part(resume: str, rank: int) -> Resumed | None:
    """This worker's part of the checkpoint at ``resume``; None when the checkpoint has no part of this worker
    (ASP/SSP: it had finished before the checkpoint was asked for)."""
    manifest = ckpt.resolve(resume)
    if manifest.body["settings"].get("mode") != "bsp" and rank not in {w["rank"] for w in manifest.body["workers"]}:
        return None
    part = manifest.part("worker", rank)
    residuals = {int(n.split(".", 1)[1]): part.tensor(n) for n in part.names if n.startswith("residual.")}
    script: dict[str, Any] = dict(part.meta.get("script", {}))
    script.update({n.split(".", 1)[1]: part.tensor(n) for n in part.names if n.startswith("script.")})
    tensors = {n: part.tensor(n) for n in part.names if n.startswith(("buffer.", "rng."))}
    return Resumed(part.meta, residuals, script, tensors)
