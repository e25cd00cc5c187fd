"""The supervision of one attempt at a job as a state machine (launcher/attempt.py): each event, its handler and
the phase or outcome it leads to. No process is started: the children are stand-ins whose exit codes the test sets,
the coordinator is a real one that never serves."""

from __future__ import annotations

import io
import signal
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from zps.launcher.attempt import Attempt, Budget, Change, ChildFailed, Outcome, Phase, Signalled
from zps.launcher.backend import ProcSpec
from zps.launcher.procs import Child
from zps.protocol.config import JobConfig

pytestmark = pytest.mark.unit


class _Proc:
    """A child process whose exit code the test sets."""

    def __init__(self, pid: int, code: int | None) -> None:
        self.pid, self.stdout, self.code = pid, None, code

    def poll(self) -> int | None:
        return self.code

    def wait(self, timeout: float | None = None) -> int:
        assert self.code is not None
        return self.code


class _Backend:
    def prepare(self, job: JobConfig) -> str:
        return "127.0.0.1"

    def processes(self, job: JobConfig, coordinator: str) -> list[ProcSpec]:
        return []


def _child(attempt: Attempt, role: str, rank: int, code: int | None = None, at: float = 0.0) -> Child:
    proc = _Proc(1000 + len(attempt.group.children), code)
    child = Child(ProcSpec(f"{role} {rank}", role, rank, ["true"], {}), proc, exited_at=at)
    attempt.group.children.append(child)
    return child


def _exit(child: Child, code: int) -> None:
    cast(_Proc, child.proc).code = code


def _said(attempt: Attempt) -> str:
    return cast(io.StringIO, attempt.out).getvalue()


Make = Callable[..., Attempt]


@pytest.fixture
def make() -> Iterator[Make]:
    made: list[Attempt] = []

    def build(**job: Any) -> Attempt:
        attempt = Attempt(JobConfig(num_servers=1, num_workers=2, progress="off", **job), _Backend(), "127.0.0.1", 0,
                          io.StringIO(), Budget(job.get("max_restarts", 0)))
        made.append(attempt)
        return attempt

    yield build
    for attempt in made:
        attempt.coordinator.sock.close(linger=0)


def _run(attempt: Attempt) -> Outcome | None:
    """Handle every event the attempt sees now, as its loop does after a wake-up."""
    while (event := attempt._next_event()) is not None:
        outcome = attempt._handle(event)
        if outcome is not None:
            return outcome
    return None


def test_a_clean_job_goes_servers_workers_draining_succeeded(make: Make) -> None:
    attempt = make()
    _child(attempt, "server", 0)
    assert attempt._next_event() is None and attempt.phase is Phase.SERVERS  # the workers wait for the servers
    attempt.coordinator.servers_ready.set()
    assert attempt._next_event() is Change.SERVERS_READY
    workers = [_child(attempt, "worker", r) for r in range(2)]
    assert _run(attempt) is None and attempt.phase is Phase.WORKERS
    for worker in workers:
        _exit(worker, 0)
    assert _run(attempt) is None and attempt.phase is Phase.DRAINING  # the server still runs: it gets its grace
    assert attempt.deadline is not None
    attempt.deadline -= 1000.0
    outcome = _run(attempt)
    assert outcome == Outcome(Phase.SUCCEEDED, 0) and not outcome.signalled
    assert "server 0 did not exit within" in _said(attempt)


def test_every_process_exited_succeeds_without_waiting(make: Make) -> None:
    attempt = make()
    attempt.phase = Phase.WORKERS
    _child(attempt, "server", 0, code=0)
    _child(attempt, "worker", 0, code=0)
    assert attempt._next_event() is Change.ALL_EXITED and _run(attempt) == Outcome(Phase.SUCCEEDED, 0)


def test_the_first_failure_ends_the_job_with_its_code(make: Make) -> None:
    attempt = make()
    attempt.phase = Phase.WORKERS
    _child(attempt, "server", 0)
    second = _child(attempt, "worker", 1, code=-signal.SIGKILL, at=2.0)
    first = _child(attempt, "worker", 0, code=3, at=1.0)
    assert attempt._next_event() == ChildFailed(first)
    assert _run(attempt) == Outcome(Phase.FAILED, 3, "worker 0 exited with code 3")
    assert second.returncode == -signal.SIGKILL


def test_a_signal_interrupts_whatever_the_phase(make: Make) -> None:
    attempt = make()
    attempt.signalled.append(signal.SIGTERM)
    _child(attempt, "worker", 0, code=1)  # a failure seen at the same time comes second
    assert attempt._next_event() == Signalled(signal.SIGTERM)
    outcome = _run(attempt)
    assert outcome == Outcome(Phase.INTERRUPTED, 128 + signal.SIGTERM, "received SIGTERM") and outcome.signalled


def test_shrink_goes_on_without_the_failed_worker(make: Make) -> None:
    attempt = make(on_worker_failure="shrink")
    attempt.phase = Phase.WORKERS
    _child(attempt, "server", 0)
    failed = _child(attempt, "worker", 0, code=1)
    survivor = _child(attempt, "worker", 1)
    assert _run(attempt) is None and attempt.phase is Phase.WORKERS and id(failed) in attempt.handled
    assert "the job goes on without it" in _said(attempt)
    _exit(survivor, 0)
    assert _run(attempt) is None and attempt.phase is Phase.DRAINING


def test_restart_without_a_restart_left_fails(make: Make) -> None:
    attempt = make(on_worker_failure="restart", max_restarts=1)
    attempt.restarts.used = 1
    attempt.phase = Phase.WORKERS
    _child(attempt, "worker", 0, code=7)
    assert _run(attempt) == Outcome(Phase.FAILED, 7, "worker 0 exited with code 7")
    assert "no restart left" in _said(attempt)


def test_a_coordinator_failure_without_a_culprit_exits_1(make: Make) -> None:
    attempt = make()
    attempt.result.append(1)
    attempt.coordinator.membership.error = "the cluster is incomplete"
    assert attempt._next_event() is Change.COORDINATOR_FAILED
    assert _run(attempt) == Outcome(Phase.FAILED, 1, "the coordinator: the cluster is incomplete")
