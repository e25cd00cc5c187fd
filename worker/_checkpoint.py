"""A worker's side of checkpoints: when to ask for one (worker 0), writing this worker's part, reading it back.

Worker 0 asks for checkpoint V with its push of step V - 1 (every ``--checkpoint-every`` steps, or once that many
seconds passed); the servers pass the request on in their replies, so every worker sees it at the end of step
V - 1 and writes its part: its step count, the error-feedback residual of every compressed key, and what the
script gave :meth:`zps.worker.DistributedOptimizer.on_checkpoint` (JSON values and tensors).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from zps.protocol import checkpoint as ckpt
from zps.protocol.codecs import ErrorFeedback
from zps.protocol.config import Config

from .client import Client

ScriptState = Callable[[], dict[str, Any]]
log = logging.getLogger("zps.worker")


class WorkerCheckpoints:
    """The checkpoints of one worker."""

    def __init__(self, client: Client, config: Config) -> None:
        self.client = client
        self.interval = config.job.checkpoint_interval()
        self.root = config.job.checkpoint_dir
        self.saved = 0
        self.last = time.monotonic()
        self.script: ScriptState | None = None

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
        """Write this worker's part of the newest checkpoint asked for, once."""
        asked = self.client.checkpoint_requested
        if self.interval is None or asked <= self.saved:
            return
        self.saved = asked
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
        meta = {"checkpoint": asked, "worker": self.client.rank, "steps": steps, "synchronized": synchronized,
                "script": script}
        path = ckpt.directory(self.root, asked) / ckpt.part_name("worker", self.client.rank)
        try:
            size = ckpt.save_part(path, tensors, meta)
        except OSError as exc:  # a full disk: this checkpoint stays incomplete, the previous one stays the newest
            log.error("%s: checkpoint %d could not be written to %s: %s; training goes on", self.client.name, asked,
                      path, exc)
            return
        info: dict[str, Any] = {"step": steps}
        plan = self.client.plan
        if self.client.rank == 0 and plan is not None:  # what the manifest needs to know of the model
            info["params"] = [[p.name, list(p.shape)] for p in plan.params]
            info["servers"] = sorted({c.server for c in plan.chunks})
        self.client.rendezvous.report_saved(asked, path.name, size, info)


def load_part(resume: str, rank: int) -> tuple[dict[str, Any], dict[int, torch.Tensor], dict[str, Any]] | None:
    """This worker's part of the checkpoint at ``resume``: (meta, residuals by key, the script's state); None when
    the checkpoint has no part of this worker (ASP/SSP: it had finished before the checkpoint was asked for)."""
    manifest = ckpt.resolve(resume)
    if manifest.body["settings"].get("mode") != "bsp" and rank not in {w["rank"] for w in manifest.body["workers"]}:
        return None
    part = manifest.part("worker", rank)
    residuals = {int(n.split(".", 1)[1]): part.tensor(n) for n in part.names if n.startswith("residual.")}
    script: dict[str, Any] = dict(part.meta.get("script", {}))
    script.update({n.split(".", 1)[1]: part.tensor(n) for n in part.names if n.startswith("script.")})
    return part.meta, residuals, script
