"""Checkpoint manifests at the coordinator: the parts members report written, and the manifest written last.

Every server and worker writes its part of checkpoint N and reports it (SAVED, :meth:`Manifests.saved`). Once every
part is on disk -- those of the servers that hold keys (worker 0 names them) and of every worker still training --
the coordinator writes the manifest (:mod:`zps.protocol.checkpoint`), which makes the checkpoint complete, and
prunes the old ones (:meth:`Manifests.complete`). In ASP and SSP a worker that finished before it saw the request
has no part; resuming, it starts where the servers' clocks say.
"""
from __future__ import annotations

import logging
from typing import Any

from zps.protocol import checkpoint as ckpt
from zps.protocol.config import JobConfig

log = logging.getLogger("zps.coordinator")
# checkpoints whose parts are still being reported; an older one that never completed is forgotten
MAX_CHECKPOINTS_IN_FLIGHT = 4


class Manifests:
    """The checkpoints of one job whose parts are being reported, and the newest complete one."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job
        self.parts: dict[int, dict[tuple[str, int], dict[str, Any]]] = {}  # parts reported, by checkpoint
        self.last = 0  # the newest complete checkpoint

    def saved(self, role: str, rank: int, checkpoint: int, size: int, info: dict[str, Any]) -> None:
        """``role`` ``rank`` wrote its part of ``checkpoint`` (``size`` bytes; ``info`` for the manifest)."""
        file = ckpt.part_name(role, rank)  # the name is the coordinator's, not the reporter's
        parts = self.parts.setdefault(checkpoint, {})
        parts[(role, rank)] = {"rank": rank, "file": file, "size": size, **info}
        for old in sorted(self.parts)[:-MAX_CHECKPOINTS_IN_FLIGHT]:  # never completed: forget them
            del self.parts[old]

    def complete(self, training: set[int]) -> None:
        """Write the manifest of every checkpoint whose parts are all on disk; ``training``: the workers that still
        train (each owes its part)."""
        for checkpoint in sorted(self.parts):
            parts = self.parts[checkpoint]
            holders = parts.get(("worker", 0), {}).get("servers")  # worker 0 says which servers hold keys
            if holders is None or not training <= {r for role, r in parts if role == "worker"}:
                continue
            if not set(holders) <= {r for role, r in parts if role == "server"}:
                continue
            self._write(checkpoint, parts)

    def _write(self, checkpoint: int, parts: dict[tuple[str, int], dict[str, Any]]) -> None:
        job = self.job
        settings = {"mode": job.mode, "num_servers": job.num_servers, "num_workers": job.num_workers,
                    "codec": job.codec, "pull_codec": job.pull_codec, "error_feedback": job.error_feedback,
                    "compress_min": job.compress_min}
        body = ckpt.manifest_body(checkpoint, settings,
                                  [p for (role, _), p in parts.items() if role == "server"],
                                  [p for (role, _), p in parts.items() if role == "worker"])
        try:
            ckpt.write_json(ckpt.directory(job.checkpoint_dir, checkpoint) / ckpt.MANIFEST, body)
            ckpt.prune(job.checkpoint_dir, job.keep, checkpoint)
        except OSError as exc:
            log.error("checkpoint %d: the manifest could not be written (%s); the previous checkpoint stays the "
                      "newest", checkpoint, exc)
            return
        for done in [c for c in self.parts if c <= checkpoint]:
            del self.parts[done]
        self.last = checkpoint
        log.info("checkpoint %d complete in %s", checkpoint, ckpt.directory(job.checkpoint_dir, checkpoint))
