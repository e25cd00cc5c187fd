"""The local backend: servers and workers as processes on this host, bound to loopback.

With ``--preload`` (the default; ``--no-preload`` or ``ZPS_PRELOAD=0`` turn it off) each attempt at the job starts
one zygote (:mod:`.zygote`): a process that imports torch and zps once and forks every server and worker, which
then start in milliseconds instead of seconds. Where it cannot, the processes start as plain ones (said once).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO

from zps.protocol.config import JobConfig

from .backend import ProcSpec, local_env, role_command, role_env
from .job import run_job
from .zygote_client import Zygote

LOOPBACK = "127.0.0.1"


class LocalBackend:
    """Every role a child process of the launcher; each runs ``zps node`` (a worker: the script)."""

    local = True  # every process on this host (what --net needs)

    def __init__(self, script: Sequence[str], base_env: Mapping[str, str] | None = None) -> None:
        if not script:
            raise ValueError("no script to run")
        self.script = list(script)
        self.base_env = base_env
        self.zygote: Zygote | None = None  # the latest attempt's

    def prepare(self, job: JobConfig) -> str:
        return LOOPBACK

    def processes(self, job: JobConfig, coordinator: str) -> list[ProcSpec]:
        base = local_env(self.base_env)
        # Share the cores instead of oversubscribing them: one intra-op thread per process unless the user chose.
        cores = os.cpu_count() or 1
        base.setdefault("OMP_NUM_THREADS", str(max(1, cores // (job.num_servers + job.num_workers))))
        zygote = self._zygote(job, base)
        procs = []
        for role, count in (("server", job.num_servers), ("worker", job.num_workers)):
            for rank in range(count):
                env = {**base, **role_env(job, role, rank, coordinator, LOOPBACK, local_rank=rank)}
                script = self.script if role == "worker" else []
                procs.append(ProcSpec(f"{role} {rank}", role, rank, role_command(sys.executable, script), env,
                                      script=tuple(script), zygote=zygote))
        return procs

    def _zygote(self, job: JobConfig, base: dict[str, str]) -> Zygote | None:
        """This attempt's zygote (it starts at the first fork), with the children's environment less their roles;
        none without --preload, off Linux, or once one failed (the launcher said so then)."""
        if not job.preload or not sys.platform.startswith("linux"):
            return None
        if self.zygote is not None and self.zygote.failure is not None:
            return None
        self.zygote = Zygote(base)
        return self.zygote


def run_local(job: JobConfig, script: Sequence[str], out: IO[str] | None = None) -> int:
    """Run ``script`` as every worker of a local cluster; return the job's exit code."""
    return run_job(job, LocalBackend(script), out=out)
