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
   process, and the launcher returns the first failure's exit code -- unless ``--on-worker-failure`` says
   otherwise for a worker: ``shrink`` goes on without it, ``restart`` starts a replacement with its rank; with
   ``--replicas`` a server that dies is replaced by its backups (the coordinator's failover). When
   every worker exits 0 the servers are told to shut down and the job returns 0;
5. teardown: SIGTERM to every process group, a bounded wait, SIGKILL;
6. with ``--max-restarts N``, a failed job is started again from its newest checkpoint, up to N times.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import IO, TYPE_CHECKING, Protocol

from zps.protocol import checkpoint as ckpt
from zps.protocol import security, stepmetrics, trace
from zps.protocol.config import Config, JobConfig

from .coordinator import Coordinator, State
from .live import LiveView
from .network import Emulator
from .procs import Child, ProcessGroup, install_signal_handlers

if TYPE_CHECKING:
    from .zygote import Zygote

# seconds the servers get to exit by themselves after the last worker finished
SHUTDOWN_GRACE = 20.0
# seconds a process that reported its failure to the coordinator gets to exit, so its exit code is the job's
CHILD_EXIT_WAIT = 5.0


class LaunchError(RuntimeError):
    """The job cannot start as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ProcSpec:
    """One process to start: ``label`` prefixes its output (``worker 1``), ``env`` is its whole environment;
    ``zygote``, where set, forks it instead of a new interpreter running ``argv`` (the local backend's --preload)."""

    label: str
    role: str
    rank: int
    argv: list[str]
    env: dict[str, str]
    zygote: Zygote | None = field(default=None, compare=False, repr=False)
    # --secure: how the process gets its keys: in its environment (ZPS_SECRETS), or on its standard input (the ssh
    # backend: an ssh command line is visible to every user of both hosts)
    secrets_on_stdin: bool = False


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


@dataclass(frozen=True)
class Outcome:
    """How one attempt at a job ended: its exit code, why (for a restart's log line), and whether a signal to the
    launcher ended it (then nothing is restarted)."""

    code: int
    cause: str = ""
    signalled: bool = False


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
    restarts = _Budget(job.max_restarts)
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
        outcome = _Attempt(job, backend, host, port, out, restarts, secrets).run()
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
        job = replace(job, resume=str(newest) if newest else "")


def resolve_resume(job: JobConfig) -> JobConfig:
    """``job`` with ``--resume`` made the one checkpoint directory every process will load (``latest``: the newest
    in ``--checkpoint-dir``); LaunchError naming the file when it is incomplete or damaged."""
    if not job.resume:
        return job
    where = job.checkpoint_dir if job.resume == "latest" else job.resume
    try:
        return replace(job, resume=str(ckpt.resolve(where).path))
    except ckpt.CheckpointError as exc:
        raise LaunchError(f"zps: --resume {job.resume}: {exc}; nothing was started") from None


class _Budget:
    """Restarts left (job restarts and worker replacements draw on one budget)."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0

    def take(self) -> bool:
        if self.used >= self.total:
            return False
        self.used += 1
        return True


def _say(out: IO[str], text: str) -> None:
    out.write(f"[zps] {text}\n")
    out.flush()


class _Attempt:
    """One run of the job: the coordinator in a thread, the processes, their supervision, the teardown."""

    def __init__(self, job: JobConfig, backend: Backend, host: str, port: int, out: IO[str], restarts: _Budget,
                 secrets: Mapping[str, security.Secrets] | None = None) -> None:
        self.job, self.backend, self.host, self.port, self.out = job, backend, host, port, out
        self.restarts, self.secrets = restarts, secrets
        self.coordinator = Coordinator(job, host=host, port=port,
                                       secrets=secrets["coordinator"] if secrets is not None else None)
        self.group = ProcessGroup(out)
        self.progress = LiveView(self.coordinator.status, job.progress, out)
        self.coordinator.on_change = self.group.changed.set
        self.network: Emulator | None = None
        if job.net:  # (refused by the launcher for jobs across hosts: the relays run here)
            self.network = Emulator(job.net)
            self.coordinator.route = self.network.route
        self.result: list[int] = []
        self.signalled: list[int] = []
        self.handled: set[int] = set()  # ids of failed workers the policy dealt with (shrink, restart)

    def run(self) -> Outcome:
        def serve() -> None:
            self.result.append(self.coordinator.serve())
            self.group.changed.set()

        coord_thread = threading.Thread(target=serve, name="zps-coordinator", daemon=True)
        coord_thread.start()

        def on_signal(signum: int) -> None:
            self.signalled.append(signum)
            self.group.changed.set()

        in_main = threading.current_thread() is threading.main_thread()
        restore = install_signal_handlers(on_signal) if in_main else (lambda: None)
        self.group.out = self.progress.start()
        self.group.say(f"coordinator at {self.coordinator.endpoint} (watch the job with: zps top --coordinator "
                       f"{self.coordinator.endpoint})")
        try:
            procs = self.backend.processes(self.job, self.coordinator.endpoint)
            for proc in procs:  # servers first, alone: they serve sooner without the workers' start-up beside them
                if proc.role == "server":
                    self._start(proc)
            return self._supervise([proc for proc in procs if proc.role != "server"])
        finally:
            self.group.terminate()
            self.progress.close(summary=True)
            self.group.out = self.out
            self.coordinator.stop()
            coord_thread.join(timeout=5)
            if self.network is not None:
                self.network.close()
            restore()

    def _start(self, proc: ProcSpec) -> None:
        env, stdin = proc.env, None
        if self.secrets is not None:
            own = self.secrets[security.secrets_label(proc.role, proc.rank)].to_json()
            if proc.secrets_on_stdin:
                stdin = own.encode() + b"\n"
            else:
                env = {**env, security.ENV_SECRETS: own}
        self.group.start(proc.label, proc.role, proc.rank, proc.argv, env, spec=proc, zygote=proc.zygote,
                         stdin=stdin)

    def _supervise(self, workers: list[ProcSpec]) -> Outcome:
        """Watch the job until it ends; start ``workers`` once every server serves."""
        group, coordinator = self.group, self.coordinator
        deadline: float | None = None  # once every worker finished: when the servers must be gone
        while True:
            group.changed.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            group.changed.clear()
            if workers and coordinator.servers_ready.is_set():
                for proc in workers:
                    self._start(proc)
                workers = []
            if self.signalled:
                name = signal.Signals(self.signalled[0]).name
                group.say(f"received {name}; stopping every process of the job")
                return Outcome(128 + self.signalled[0], f"received {name}", signalled=True)
            if self.result and self.result[0] != 0:
                group.say(f"coordinator: {coordinator.error}")
                # a process that failed said so to the coordinator before it exited: its exit code is the job's
                culprit = next((c for c in group.children if (c.role, c.rank) == coordinator.failed_by), None)
                if culprit is not None and _exited(group, culprit, within=CHILD_EXIT_WAIT):
                    return self._stop(culprit)
                return Outcome(1, f"the coordinator: {coordinator.error}")
            for child in self._failures():
                if child.role == "server" and self.job.replicas and self.coordinator.state is State.RUNNING:
                    self._fail_over(child)
                elif child.role != "worker" or self.job.on_worker_failure == "abort" or not self._cope(child):
                    return self._stop(child)
            latest = {c.rank: c for c in group.children if c.role == "worker"}  # a replacement replaces
            if not workers and all(c.returncode == 0 or id(c) in self.handled for c in latest.values()):
                if not group.running():
                    return Outcome(0)
                if coordinator.live_workers() - set(latest):
                    continue  # workers that joined (--max-workers) still train: the servers exit when they are done
                if deadline is None:
                    deadline = time.monotonic() + SHUTDOWN_GRACE
                elif time.monotonic() >= deadline:
                    running = ", ".join(c.label for c in group.running())
                    group.say(f"every worker finished but {running} did not exit within {SHUTDOWN_GRACE:.0f}s; "
                              "ending it")
                    return Outcome(0)

    def _failures(self) -> list[Child]:
        """Children that failed and that no policy dealt with yet, first failure first."""
        failed = [c for c in self.group.children if c.returncode not in (None, 0) and id(c) not in self.handled]
        return sorted(failed, key=lambda c: c.exited_at or 0.0)

    def _cope(self, child: Child) -> bool:
        """--on-worker-failure shrink or restart for a failed worker; False when the job must end after all."""
        how = _how(child)
        if self.job.on_worker_failure == "restart":
            if not self.restarts.take():
                self.group.say(f"{child.label} {how}; no restart left (--max-restarts {self.restarts.total})")
                return False
            self.group.say(f"{child.label} {how}: starting a replacement ({self.restarts.used} of "
                           f"{self.restarts.total} restarts; --on-worker-failure restart)")
        else:
            self.group.say(f"{child.label} {how}: the job goes on without it (--on-worker-failure shrink)")
        self.handled.add(id(child))
        self.coordinator.lost("worker", child.rank, f"{child.label} {how}")
        if self.job.on_worker_failure == "restart":
            assert child.spec is not None
            self._start(child.spec)
        return True

    def _fail_over(self, child: Child) -> None:
        """--replicas: a server died; the coordinator promotes its backups (or fails the job when a chunk lost every
        copy, which then ends here as a coordinator failure)."""
        self.group.say(f"{child.label} {_how(child)}: its backups take over its chunks (--replicas "
                       f"{self.job.replicas})")
        _print_tail(self.group, child)
        self.handled.add(id(child))
        self.coordinator.lost("server", child.rank, f"{child.label} {_how(child)}")

    def _stop(self, child: Child) -> Outcome:
        """The first failure ends the job: say how, with its last lines; its exit code is the job's."""
        how = _how(child)
        self.group.say(f"{child.label} {how}: stopping the job (first failure)")
        _print_tail(self.group, child)
        code = child.returncode
        assert code is not None
        return Outcome(128 - code if code < 0 else code, f"{child.label} {how}")


def _how(child: Child) -> str:
    code = child.returncode
    assert code is not None
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"


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


def _print_tail(group: ProcessGroup, child: Child) -> None:
    if child.tail:
        group.say(f"last lines of {child.label}:")
        for line in child.tail[-10:]:
            group.say(f"  {line}")
