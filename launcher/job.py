"""One job's lifecycle, whatever started its processes: coordinator, children, supervision, teardown.

The coordinator runs in a thread of the launcher. The job ends as a unit: the first child to fail, a failure the
coordinator detects (a missing role at start-up, a lost heartbeat), or a signal to the launcher ends every
process, and the launcher returns the first failure's exit code. When every worker exits 0 the servers are told
to shut down and the job returns 0.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import IO, Callable

from .coordinator import Coordinator
from .procs import Child, ProcessGroup, install_signal_handlers


@dataclass(frozen=True)
class JobSpec:
    """What every backend needs to know about a job."""

    num_servers: int
    num_workers: int
    mode: str = "bsp"
    staleness: int = 0
    host: str = "127.0.0.1"  # where the coordinator and (local) servers bind
    port: int = 0
    timeout: float = 120.0
    heartbeat_timeout: float = 15.0
    optimizer: str = ""
    codec: str = ""
    pull_codec: str = ""
    error_feedback: bool = False
    compress_min: int = 1024
    # seconds the servers get to exit by themselves after the last worker finished
    shutdown_grace: float = 20.0

    def role_env(self, role: str, rank: int, coordinator: str, host: str | None = None) -> dict[str, str]:
        """The ``ZPS_*`` variables of one process."""
        env = {
            "ZPS_ROLE": role,
            "ZPS_RANK": str(rank),
            "ZPS_COORDINATOR": coordinator,
            "ZPS_NUM_SERVERS": str(self.num_servers),
            "ZPS_NUM_WORKERS": str(self.num_workers),
            "ZPS_HOST": host or self.host,
            "ZPS_TIMEOUT": str(self.timeout),
            "ZPS_HEARTBEAT_TIMEOUT": str(self.heartbeat_timeout),
            "ZPS_ERROR_FEEDBACK": "1" if self.error_feedback else "0",
            "ZPS_COMPRESS_MIN": str(self.compress_min),
        }
        for name in ("optimizer", "codec", "pull_codec"):
            value = getattr(self, name)
            if value:
                env["ZPS_" + name.upper()] = value
        return env


@dataclass(frozen=True)
class ProcSpec:
    label: str  # "worker 1"
    role: str
    argv: list[str]
    env: dict[str, str]  # the complete environment of the child


Starter = Callable[[str], list[ProcSpec]]  # coordinator host:port -> the processes to start


def run_job(spec: JobSpec, starter: Starter, out: IO[str] | None = None) -> int:
    """Run a job whose processes ``starter`` describes; return its exit code (0, the first failure's, or 128+signal)."""
    coordinator = Coordinator(
        spec.num_servers,
        spec.num_workers,
        mode=spec.mode,
        staleness=spec.staleness,
        host=spec.host,
        port=spec.port,
        timeout=spec.timeout,
        heartbeat_timeout=spec.heartbeat_timeout,
    )
    result: list[int] = []
    group = ProcessGroup(out)

    def serve() -> None:
        result.append(coordinator.serve())
        group.changed.set()

    coord_thread = threading.Thread(target=serve, name="zps-coordinator", daemon=True)
    coord_thread.start()
    signalled: list[int] = []

    def on_signal(signum: int) -> None:
        signalled.append(signum)
        group.changed.set()

    restore = install_signal_handlers(on_signal) if threading.current_thread() is threading.main_thread() else (lambda: None)
    code = 0
    try:
        for proc in starter(coordinator.endpoint):
            group.start(proc.label, proc.role, proc.argv, proc.env)
        code = _supervise(spec, group, coordinator, result, signalled)
    finally:
        group.terminate()
        coordinator.stop()
        coord_thread.join(timeout=5)
        restore()
    return code


def _supervise(spec: JobSpec, group: ProcessGroup, coordinator: Coordinator, result: list[int], signalled: list[int]) -> int:
    workers_done_at: float | None = None
    while True:
        group.changed.wait(timeout=1.0)
        group.changed.clear()
        if signalled:
            group.say(f"received {signal.Signals(signalled[0]).name}; stopping every process of the job")
            return 128 + signalled[0]
        if result and result[0] != 0:
            group.say(f"coordinator: {coordinator.error}")
            return 1
        failed = [c for c in group.children if c.returncode not in (None, 0)]
        if failed:
            first = min(failed, key=lambda c: c.exited_at or 0.0)
            code = first.returncode
            assert code is not None
            if code < 0:  # killed by a signal: report it as a shell would, 128 + N
                how = f"was killed by {signal.Signals(-code).name}"
                code = 128 - code
            else:
                how = f"exited with code {code}"
            group.say(f"{first.label} {how}: stopping the job (first failure)")
            _print_tail(group, first)
            return code
        workers = [c for c in group.children if c.role == "worker"]
        if all(c.returncode == 0 for c in workers):
            if not group.running():
                return 0
            workers_done_at = workers_done_at or time.monotonic()
            if time.monotonic() - workers_done_at > spec.shutdown_grace:
                group.say(
                    "every worker finished but "
                    + ", ".join(c.label for c in group.running())
                    + f" did not exit within {spec.shutdown_grace:.0f}s; ending it"
                )
                return 0


def _print_tail(group: ProcessGroup, child: Child) -> None:
    if child.tail:
        group.say(f"last lines of {child.label}:")
        for line in child.tail[-10:]:
            group.say(f"  {line}")


def local_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The base environment of children started from this host: the launcher's own, with unbuffered output."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
