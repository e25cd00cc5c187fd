"""The local backend: coordinator, servers and workers as processes on this host, bound to loopback."""
from __future__ import annotations

import os
import sys
from typing import IO, Sequence

from .job import JobSpec, ProcSpec, local_env, run_job


def local_processes(spec: JobSpec, script: Sequence[str], coordinator: str, base_env: dict[str, str] | None = None) -> list[ProcSpec]:
    """Servers run ``python -m zps.ps``; workers run ``python SCRIPT ARGS...``; each gets its ``ZPS_*`` variables."""
    base = local_env(base_env)
    # Share the cores instead of oversubscribing them: one intra-op thread per process unless the user chose.
    cores = os.cpu_count() or 1
    base.setdefault("OMP_NUM_THREADS", str(max(1, cores // (spec.num_servers + spec.num_workers))))
    procs = []
    for rank in range(spec.num_servers):
        env = {**base, **spec.role_env("server", rank, coordinator)}
        procs.append(ProcSpec(f"server {rank}", "server", [sys.executable, "-m", "zps.ps"], env))
    for rank in range(spec.num_workers):
        env = {**base, **spec.role_env("worker", rank, coordinator)}
        procs.append(ProcSpec(f"worker {rank}", "worker", [sys.executable, "-u", *script], env))
    return procs


def run_local(spec: JobSpec, script: Sequence[str], out: IO[str] | None = None) -> int:
    """Run ``script`` as every worker of a local cluster; return the job's exit code."""
    if not script:
        raise ValueError("no script to run")
    return run_job(spec, lambda coordinator: local_processes(spec, script, coordinator), out)
