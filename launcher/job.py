"""One job's lifecycle, whatever starts its processes: prepare, coordinator, start, supervise, tear down.

:func:`run_job` drives every launcher that supervises its processes (``zps run``, ``zps launch``); a
:class:`Backend` only says where the processes go and how each one starts:

1. ``backend.prepare(job)`` places the processes and checks that everything can start (the ssh backend's
   preflight); it returns the address the coordinator binds, or raises :class:`LaunchError` naming each problem;
2. the coordinator runs in a thread of the launcher;
3. ``backend.processes(job, coordinator)`` gives one :class:`ProcSpec` per server and worker; each is started in
   its own session, its output prefixed by its label;
4. supervision: the job ends as a unit. The first child to fail, a failure the coordinator detects (a missing
   role at start-up, a lost heartbeat, a worker reporting an error) or a signal to the launcher ends every
   process, and the launcher returns the first failure's exit code. When every worker exits 0 the servers are
   told to shut down and the job returns 0;
5. teardown: SIGTERM to every process group, a bounded wait, SIGKILL.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

from zps.protocol.config import Config, JobConfig

from .coordinator import Coordinator
from .procs import Child, ProcessGroup, install_signal_handlers

# seconds the servers get to exit by themselves after the last worker finished
SHUTDOWN_GRACE = 20.0
# seconds a process that reported its failure to the coordinator gets to exit, so its exit code is the job's
CHILD_EXIT_WAIT = 5.0


class LaunchError(RuntimeError):
    """The job cannot start as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ProcSpec:
    """One process to start: ``label`` prefixes its output (``worker 1``), ``env`` is its whole environment."""

    label: str
    role: str
    rank: int
    argv: list[str]
    env: dict[str, str]


class Backend(Protocol):
    """Where a job's servers and workers run and how each one starts (local processes, ssh, ...)."""

    def prepare(self, job: JobConfig) -> str:
        """Place the processes and check that they can start; return the address the coordinator binds."""

    def processes(self, job: JobConfig, coordinator: str) -> list[ProcSpec]:
        """Every server and worker of the job, servers first; ``coordinator`` is its ``host:port``."""


def role_command(python: str, script: Sequence[str]) -> list[str]:
    """How every backend starts a role: ``zps node`` runs the role its ``ZPS_*`` variables name (a worker runs
    ``script`` in that process, so a script that fails is reported as a failure, never as a clean exit)."""
    return [python, "-u", "-m", "zps.launcher.cli", "node", *script]


def role_env(job: JobConfig, role: str, rank: int, coordinator: str, host: str = "127.0.0.1",
             local_rank: int = 0) -> dict[str, str]:
    """The ``ZPS_*`` variables of one process of ``job``."""
    return Config(role=role, coordinator=coordinator, rank=rank, host=host, local_rank=local_rank, job=job).to_env()


def local_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The base environment of children started from this host: the launcher's own, with unbuffered output."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_job(job: JobConfig, backend: Backend, port: int = 0, out: IO[str] | None = None) -> int:
    """Run ``job`` on ``backend``; return its exit code (0, the first failure's, or 128 + signal).

    A problem found before anything starts is printed and returns 2.
    """
    out = out or sys.stdout
    try:
        host = backend.prepare(job)
    except LaunchError as exc:
        out.write(f"{exc}\n")
        out.flush()
        return 2
    coordinator = Coordinator(job, host=host, port=port)
    result: list[int] = []
    group = ProcessGroup(out)
    coordinator.on_change = group.changed.set

    def serve() -> None:
        result.append(coordinator.serve())
        group.changed.set()

    coord_thread = threading.Thread(target=serve, name="zps-coordinator", daemon=True)
    coord_thread.start()
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        group.changed.set()

    in_main = threading.current_thread() is threading.main_thread()
    restore = install_signal_handlers(on_signal) if in_main else (lambda: None)
    try:
        procs = backend.processes(job, coordinator.endpoint)
        for proc in procs:  # servers first, alone: they serve sooner without the workers' start-up beside them
            if proc.role == "server":
                group.start(proc.label, proc.role, proc.rank, proc.argv, proc.env)
        workers = [proc for proc in procs if proc.role != "server"]
        return _supervise(group, coordinator, result, signalled, workers)
    finally:
        group.terminate()
        coordinator.stop()
        coord_thread.join(timeout=5)
        restore()


def _supervise(group: ProcessGroup, coordinator: Coordinator, result: list[int], signalled: list[int],
               workers: list[ProcSpec]) -> int:
    """Watch the job until it ends; start ``workers`` once every server serves. Its exit code."""
    deadline: float | None = None  # once every worker finished: when the servers must be gone
    while True:
        group.changed.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        group.changed.clear()
        if workers and coordinator.servers_ready.is_set():
            for proc in workers:
                group.start(proc.label, proc.role, proc.rank, proc.argv, proc.env)
            workers = []
        if signalled:
            group.say(f"received {signal.Signals(signalled[0]).name}; stopping every process of the job")
            return 128 + signalled[0]
        if result and result[0] != 0:
            group.say(f"coordinator: {coordinator.error}")
            # a process that failed said so to the coordinator before it exited: its exit code is the job's
            culprit = next((c for c in group.children if (c.role, c.rank) == coordinator.failed_by), None)
            if culprit is not None and _exited(group, culprit, within=CHILD_EXIT_WAIT):
                return _report(group, culprit)
            return 1
        child = _first_failure(group)
        if child is not None:
            return _report(group, child)
        if not workers and all(c.returncode == 0 for c in group.children if c.role == "worker"):
            if not group.running():
                return 0
            if deadline is None:
                deadline = time.monotonic() + SHUTDOWN_GRACE
            elif time.monotonic() >= deadline:
                running = ", ".join(c.label for c in group.running())
                group.say(f"every worker finished but {running} did not exit within {SHUTDOWN_GRACE:.0f}s; ending it")
                return 0


def _first_failure(group: ProcessGroup) -> Child | None:
    """The child that failed first, if one did."""
    failed = [c for c in group.children if c.returncode not in (None, 0)]
    return min(failed, key=lambda c: c.exited_at or 0.0) if failed else None


def _exited(group: ProcessGroup, child: Child, within: float) -> bool:
    """Whether ``child`` exited, waiting up to ``within`` seconds for it."""
    deadline = time.monotonic() + within
    while child.returncode is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        group.changed.wait(left)
        group.changed.clear()
    return True


def _report(group: ProcessGroup, child: Child) -> int:
    """Say how ``child`` failed; its exit code as a shell gives it (128 + N for signal N)."""
    code = child.returncode
    assert code is not None
    if code < 0:
        how, code = f"was killed by {signal.Signals(-code).name}", 128 - code
    else:
        how = f"exited with code {code}"
    group.say(f"{child.label} {how}: stopping the job (first failure)")
    _print_tail(group, child)
    return code


def _print_tail(group: ProcessGroup, child: Child) -> None:
    if child.tail:
        group.say(f"last lines of {child.label}:")
        for line in child.tail[-10:]:
            group.say(f"  {line}")
