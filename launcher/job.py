"""One job's lifecycle, whatever starts its processes: prepare, coordinator, start, supervise, tear down.

:func:`run_job` drives every launcher that supervises its processes (``zps run``, ``zps launch``); a
:class:`~.backend.Backend` only says where the processes go and how each one starts:

1. ``backend.prepare(job)`` places the processes and checks that everything can start (the ssh backend's
   preflight); it returns the address the coordinator binds, or raises :class:`~.backend.LaunchError` naming each
   problem;
2. one :class:`~.attempt.Attempt` runs the coordinator in a thread of the launcher, starts the servers, then the
   workers once every server serves (``backend.processes(job, coordinator)``: one
   :class:`~.backend.ProcSpec` each, started in its own session, its output prefixed by its label), supervises
   them as a state machine (:mod:`.attempt`) and tears them down: SIGTERM to every process group, a bounded wait,
   SIGKILL. The job ends as a unit: the first failure ends every process and its exit code is the job's --
   unless ``--on-worker-failure`` or ``--replicas`` say otherwise;
3. with ``--max-restarts N``, a failed job is started again from its newest checkpoint, up to N times.
"""
from __future__ import annotations

import os
import sys
from dataclasses import fields, replace
from typing import IO

from zps.protocol import checkpoint as ckpt
from zps.protocol import security
from zps.protocol.config import JobConfig
from zps.protocol.files import check_directory
from zps.telemetry import stepmetrics, trace

from .attempt import Attempt, Budget
from .backend import Backend, LaunchError


def run_job(job: JobConfig, backend: Backend, port: int = 0, out: IO[str] | None = None) -> int:
    """Run ``job`` on ``backend``; return its exit code (0, the first failure's, or 128 + signal).

    A problem found before anything starts is printed and returns 2. With ``--max-restarts N`` a failed job is torn
    down and started again from its newest checkpoint, up to N times (worker restarts under
    ``--on-worker-failure restart`` draw on the same N), each restart logged with its cause.
    """
    out = out or sys.stdout
    if job.net and not getattr(backend, "local", False):
        out.write("--net emulates a network between processes on this host: use it with zps run\n")
        out.flush()
        return 2
    restarts = Budget(job.max_restarts)
    if job.metrics_out:  # every process writes its part beside it, wherever it runs from
        job = replace(job, metrics_out=os.path.abspath(job.metrics_out))
        stepmetrics.start(job.metrics_out, {f.name: getattr(job, f.name) for f in fields(job)})
    # --secure: the job's keys, made here, held in memory, handed to each process as it starts
    secrets = security.make_secrets(job.num_servers, job.num_workers) if job.secure else None
    while True:
        try:
            job = resolve_resume(job)
            host = backend.prepare(job)
        except LaunchError as exc:
            out.write(f"{exc}\n")
            out.flush()
            return 2
        outcome = Attempt(job, backend, host, port, out, restarts, secrets).run()
        if job.metrics_out:
            count = stepmetrics.merge(job.metrics_out)
            _say(out, f"metrics: {count} records in {job.metrics_out}")
        if job.trace:
            merged = trace.merge(job.trace)
            if merged is not None:
                _say(out, f"trace: {merged} (open it in https://ui.perfetto.dev or chrome://tracing)")
        if outcome.code == 0 or outcome.signalled or not restarts.take():
            return outcome.code
        newest = ckpt.complete(job.checkpoint_dir)[-1] if job.checkpoint_dir and ckpt.complete(job.checkpoint_dir) \
            else None
        where = f"from {newest}" if newest else "from the start (no checkpoint yet)"
        _say(out, f"restart {restarts.used} of {restarts.total} after: {outcome.cause}; resuming {where}")
        # --kill is a fault injected once: the restarted job is not killed again where the first attempt was
        job = replace(job, resume=str(newest) if newest else "", kill="")


def resolve_resume(job: JobConfig) -> JobConfig:
    """``job`` with ``--resume`` made the one checkpoint directory every process will load (``latest``: the newest
    in ``--checkpoint-dir``), every part of it verified (content hash, header, metadata: ``ckpt.verify``);
    LaunchError naming the file when it is incomplete, damaged or another user's, and when ``--checkpoint-dir``
    is a directory other users can write."""
    if job.checkpoint_dir and os.path.lexists(job.checkpoint_dir):
        try:
            check_directory(job.checkpoint_dir)
        except OSError as exc:
            raise LaunchError(f"zps: --checkpoint-dir {job.checkpoint_dir}: {exc.strerror} (another user could plant "
                              "checkpoints or links there); nothing was started") from None
    if not job.resume:
        return job
    where = job.checkpoint_dir if job.resume == "latest" else job.resume
    try:
        manifest = ckpt.resolve(where)
        ckpt.verify(manifest)
        return replace(job, resume=str(manifest.path))
    except ckpt.CheckpointError as exc:
        raise LaunchError(f"zps: --resume {job.resume}: {exc}; nothing was started") from None


def _say(out: IO[str], text: str) -> None:
    out.write(f"[zps] {text}\n")
    out.flush()
