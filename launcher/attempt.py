"""One attempt at a job: the coordinator in a thread, the processes, their supervision, the teardown.

Supervision is a state machine (torch elastic's WorkerState and RunResult are the anchor): :class:`Phase` says
where the attempt is, every change the launcher observes is one event with one handler, and the attempt ends in
one :class:`Outcome`. The phases:

* ``SERVERS`` -- the servers run; the workers wait until every server serves (they start sooner alone);
* ``WORKERS`` -- the workers run;
* ``DRAINING`` -- every worker finished: the coordinator told the servers to shut down, and they have
  :data:`SHUTDOWN_GRACE` seconds to exit;
* ``SUCCEEDED``, ``FAILED``, ``INTERRUPTED`` -- the attempt is over (the teardown ends whatever still runs).

The events, in the order they are looked for, and what each one does:

* ``SERVERS_READY`` -- ``SERVERS -> WORKERS``: the workers start;
* :class:`Signalled` -- any phase ``-> INTERRUPTED``: exit code 128 + N, and no restart;
* ``COORDINATOR_FAILED`` -- ``-> FAILED`` (a role missing at start-up, a lost heartbeat, a worker that
  reported an error): the exit code of the member whose failure it was, where that process exits within
  :data:`CHILD_EXIT_WAIT`, else 1;
* :class:`ChildFailed` -- a server under ``--replicas`` while the job runs: its backups take over (no change); a
  worker under ``--on-worker-failure shrink|restart``: the job goes on without it, or with a replacement (no
  change); any other: ``-> FAILED`` with its exit code (the first failure's);
* ``WORKERS_FINISHED`` -- ``WORKERS -> DRAINING``: every worker exited 0 or was dealt with by the policy,
  and no worker that joined later (``--max-workers``) still trains;
* ``ALL_EXITED`` -- ``WORKERS | DRAINING -> SUCCEEDED``: every worker finished and no process runs;
* ``GRACE_OVER`` -- ``DRAINING -> SUCCEEDED``: the servers did not exit in time (said, then ended).
"""
from __future__ import annotations

import enum
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO

from zps.lab.network import Emulator
from zps.protocol import security
from zps.protocol.config import JobConfig
from zps.telemetry.live import LiveView

from .backend import Backend, ProcSpec
from .coordinator import Coordinator, State
from .procs import Child, ProcessGroup, install_signal_handlers

# seconds the servers get to exit by themselves after the last worker finished
SHUTDOWN_GRACE = 20.0
# seconds a process that reported its failure to the coordinator gets to exit, so its exit code is the job's
CHILD_EXIT_WAIT = 5.0


class Phase(enum.Enum):
    SERVERS = "servers starting"
    WORKERS = "workers running"
    DRAINING = "servers draining"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended: its final phase, its exit code and why (for a restart's log line)."""

    phase: Phase
    code: int
    cause: str = ""

    @property
    def signalled(self) -> bool:
        """A signal to the launcher ended it (then nothing is restarted)."""
        return self.phase is Phase.INTERRUPTED


# -- the events ----------------------------------------------------------------------------------------------------
class Change(enum.Enum):
    """The events that carry nothing but themselves."""

    SERVERS_READY = "every server serves"
    COORDINATOR_FAILED = "the coordinator failed the job"
    WORKERS_FINISHED = "every worker finished"
    ALL_EXITED = "every process exited"
    GRACE_OVER = "the servers' grace is over"


@dataclass(frozen=True)
class Signalled:
    signum: int


@dataclass(frozen=True)
class ChildFailed:
    child: Child


Event = Change | Signalled | ChildFailed


class Budget:
    """Restarts left (job restarts and worker replacements draw on one budget)."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0

    def take(self) -> bool:
        if self.used >= self.total:
            return False
        self.used += 1
        return True


class Attempt:
    """One run of the job on ``backend``, its coordinator bound to ``host:port``; :meth:`run` returns its
    :class:`Outcome`."""

    def __init__(self, job: JobConfig, backend: Backend, host: str, port: int, out: IO[str], restarts: Budget,
                 secrets: Mapping[str, security.Secrets] | None = None) -> None:
        self.job, self.backend, self.out = job, backend, out
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
        self.phase = Phase.SERVERS
        self.workers: list[ProcSpec] = []  # started once every server serves
        self.deadline: float | None = None  # DRAINING: when the servers must be gone
        self.result: list[int] = []  # the coordinator's exit code, once it ended
        self.signalled: list[int] = []
        self.handled: set[int] = set()  # ids of failed children a policy dealt with (failover, shrink, restart)

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
            self.workers = [proc for proc in procs if proc.role != "server"]
            return self._supervise()
        finally:
            self.group.terminate()
            self.progress.close(summary=True)
            self.group.out = self.out
            self.coordinator.stop()
            coord_thread.join(timeout=5)
            if self.network is not None:
                self.network.close()
            restore()

    # -- the state machine ---------------------------------------------------------------------------------------
    def _supervise(self) -> Outcome:
        """Wait for a change, handle what it means event by event; until an event ends the attempt."""
        while True:
            timeout = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            self.group.changed.wait(timeout)
            self.group.changed.clear()
            while (event := self._next_event()) is not None:
                outcome = self._handle(event)
                if outcome is not None:
                    self.phase = outcome.phase
                    return outcome

    def _next_event(self) -> Event | None:
        """The first event the world shows now (the order of the module docstring), or None."""
        if self.phase is Phase.SERVERS and self.coordinator.servers_ready.is_set():
            return Change.SERVERS_READY
        if self.signalled:
            return Signalled(self.signalled[0])
        if self.result and self.result[0] != 0:
            return Change.COORDINATOR_FAILED
        failures = self._failures()
        if failures:
            return ChildFailed(failures[0])
        if self.phase is Phase.SERVERS or not self._workers_done():
            return None
        if not self.group.running():
            return Change.ALL_EXITED
        if self.coordinator.live_workers() - self._latest_workers().keys():
            return None  # workers that joined (--max-workers) still train: the servers exit when they are done
        if self.phase is Phase.WORKERS:
            return Change.WORKERS_FINISHED
        assert self.deadline is not None
        return Change.GRACE_OVER if time.monotonic() >= self.deadline else None

    def _handle(self, event: Event) -> Outcome | None:
        """What ``event`` does: a new phase, or the attempt's outcome."""
        match event:
            case Change.SERVERS_READY:
                for proc in self.workers:
                    self._start(proc)
                self.workers = []
                self.phase = Phase.WORKERS
            case Signalled(signum):
                name = signal.Signals(signum).name
                self.group.say(f"received {name}; stopping every process of the job")
                return Outcome(Phase.INTERRUPTED, 128 + signum, f"received {name}")
            case Change.COORDINATOR_FAILED:
                return self._coordinator_failed()
            case ChildFailed(child):
                return self._child_failed(child)
            case Change.WORKERS_FINISHED:
                self.phase = Phase.DRAINING
                self.deadline = time.monotonic() + SHUTDOWN_GRACE
            case Change.ALL_EXITED:
                return Outcome(Phase.SUCCEEDED, 0)
            case Change.GRACE_OVER:
                running = ", ".join(c.label for c in self.group.running())
                self.group.say(f"every worker finished but {running} did not exit within {SHUTDOWN_GRACE:.0f}s; "
                               "ending it")
                return Outcome(Phase.SUCCEEDED, 0)
        return None

    def _coordinator_failed(self) -> Outcome:
        coordinator = self.coordinator
        self.group.say(f"coordinator: {coordinator.error}")
        # a process that failed said so to the coordinator before it exited: its exit code is the job's
        culprit = next((c for c in self.group.children if (c.role, c.rank) == coordinator.failed_by), None)
        if culprit is not None and _exited(self.group, culprit, within=CHILD_EXIT_WAIT):
            return self._stop(culprit)
        return Outcome(Phase.FAILED, 1, f"the coordinator: {coordinator.error}")

    def _child_failed(self, child: Child) -> Outcome | None:
        if child.role == "server" and self.job.replicas and self.coordinator.state is State.RUNNING:
            self._fail_over(child)
            return None
        if child.role == "worker" and self.job.on_worker_failure != "abort" and self._cope(child):
            return None
        return self._stop(child)

    # -- what the handlers look at and do ------------------------------------------------------------------------
    def _start(self, proc: ProcSpec) -> None:
        env, stdin = proc.env, None
        if self.secrets is not None:
            own = self.secrets[security.secrets_label(proc.role, proc.rank)].to_json()
            if proc.secrets_on_stdin:
                stdin = own.encode() + b"\n"
            else:
                env = {**env, security.ENV_SECRETS: own}
        self.group.start(proc, env, stdin)

    def _failures(self) -> list[Child]:
        """Children that failed and that no policy dealt with yet, first failure first."""
        failed = [c for c in self.group.children if c.returncode not in (None, 0) and id(c) not in self.handled]
        return sorted(failed, key=lambda c: c.exited_at or 0.0)

    def _latest_workers(self) -> dict[int, Child]:
        """Each worker rank's newest process (a replacement replaces)."""
        return {c.rank: c for c in self.group.children if c.role == "worker"}

    def _workers_done(self) -> bool:
        """Every worker exited 0 or failed and was dealt with by the policy."""
        return all(c.returncode == 0 or id(c) in self.handled for c in self._latest_workers().values())

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
        return Outcome(Phase.FAILED, 128 - code if code < 0 else code, f"{child.label} {how}")


def _how(child: Child) -> str:
    code = child.returncode
    assert code is not None
    cause = getattr(child.proc, "cause", None)  # a Starter's role: how it ended, where a code cannot say
    if cause:
        return cause
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
