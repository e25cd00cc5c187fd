"""Consistency modes: when a push is applied and when a pull may be answered.

- BSP: a step's pushes of all live workers are summed per key, averaged and applied once; a pull for step t
  waits until the key's version reaches t.
- ASP: each push is applied on arrival; pulls are answered at once.
- SSP(s): pushes are applied on arrival; a pull from a worker at clock c waits until every live worker has
  reached clock c - s. A worker's clock is the step of its latest pull (it has pushed all earlier steps).

Every mode applies a retried push once: pushes carry (worker, step, key).

A worker may join a running job (``--max-workers``): it declares its keys, then asks (JOIN) to be counted from a
step. BSP takes that step when no key here has begun to aggregate it, else the first such step, and says which;
the worker asks every server again with the latest until all agree, so its first step is one step of every key
(moving a joiner later completes a step that waited only for it). ASP and SSP give it at least the slowest live
worker's clock.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from zps.protocol.config import MODES
from zps.protocol.messages import ErrorCode, ProtocolError

from .store import Aggregate, KeyState

Completed = tuple[KeyState, Aggregate]  # a key whose step is complete, and its aggregate

# the default of how far one push or pull may move a worker's step past the furthest it reached (the job's
# --max-pending: what a worker can have in flight; one forged step must not make the worker's next pushes look like
# duplicates, nor a pull set its clock anywhere)
MAX_STEP_JUMP = 256


class Consistency:
    """Shared state: the live workers and their clocks. Subclasses decide push and pull semantics."""

    name = ""
    arrival = False  # BSP: sum a step's pushes as they arrive, not in rank order (--bsp-sum arrival)

    def __init__(self, num_workers: int, staleness: int = 0, max_jump: int = MAX_STEP_JUMP) -> None:
        self.live: set[int] = set(range(num_workers))
        self.staleness = staleness
        self.max_jump = max_jump
        self.clock: dict[int, int] = {w: 0 for w in self.live}
        self.reached: dict[int, int] = {}  # the furthest step of each worker's pushes applied (ASP/SSP)
        self.since: dict[int, int] = {}  # a worker that joined the running job: the step (or clock) it counts from
        self.max_served_gap = 0  # largest (clock of a served pull - slowest live clock) seen

    def check_push(self, state: KeyState, worker: int, step: int) -> bool:
        """Validate a push without changing anything; return False for a duplicate (to be acknowledged only)."""
        raise NotImplementedError

    def furthest(self, worker: int, last: int = -1) -> int:
        """The furthest step ``worker`` reached here: its clock, its pushes applied, ``last`` (a key's last push)."""
        return max(last, self.clock.get(worker, 0), self.reached.get(worker, 0))

    def check_pull(self, worker: int, step: int) -> None:
        """STEP_AHEAD for a pull more than :attr:`max_jump` steps past the furthest step ``worker`` reached (a pull
        sets the worker's clock: one of any step would make every later push of the worker look old)."""
        if step > self.furthest(worker) + self.max_jump + 1:
            raise ProtocolError(ErrorCode.STEP_AHEAD, f"pull of step {step} from worker {worker}, whose furthest step "
                                                      f"is {self.furthest(worker)}: a step moves forward by at most "
                                                      f"{self.max_jump} at a time (--max-pending)")

    def push(self, state: KeyState, worker: int, step: int, grad: torch.Tensor | None, hp: dict[str, Any] | None,
             owned: bool = True) -> Aggregate | None:
        """Take one checked push (``grad`` None: the worker had no gradient; ``hp``: the hyper-parameters it asks
        for; ``owned``: the tensor is the server's to keep); return what to apply to the key now, or None (BSP:
        still aggregating; ASP/SSP: nothing to apply)."""
        raise NotImplementedError

    def applied(self, state: KeyState, worker: int, step: int) -> None:
        """The update of ``worker``'s push for ``step`` was applied (called only after the optimizer step
        succeeded: a push whose update failed is not a duplicate when it is sent again)."""

    def pull_ready(self, state: KeyState, worker: int, step: int) -> bool:
        raise NotImplementedError

    def pull_waiting_for(self, state: KeyState, worker: int, step: int) -> str:
        """Why a pull is not ready: names the workers (and clocks) it waits for."""
        raise NotImplementedError

    def note_clock(self, worker: int, step: int) -> None:
        if worker in self.live:
            self.clock[worker] = max(self.clock.get(worker, 0), step)

    def slowest(self) -> int:
        return min((self.clock[w] for w in self.live), default=0)

    def served(self, worker: int, step: int) -> None:
        if self.live:
            self.max_served_gap = max(self.max_served_gap, step - self.slowest())

    def join(self, worker: int, step: int, states: Iterable[KeyState]) -> tuple[int, list[Completed]]:
        """A worker joins the running job, asking to count from ``step``: the step it counts from, and the updates
        that became complete as a result."""
        start = max(step, self.slowest())
        self.live.add(worker)
        self.clock[worker] = self.since[worker] = start
        return start, []

    def leave(self, worker: int, states: Iterable[KeyState]) -> list[Completed]:
        """A worker finished: stop waiting for it. Returns the updates that became complete as a result."""
        self.live.discard(worker)
        self.clock.pop(worker, None)
        self.since.pop(worker, None)
        return []


class BSP(Consistency):
    """A step's pushes of every live worker are summed in rank order (:meth:`KeyState.contribute`: the same bits
    whatever order they arrive in) and averaged over the workers that pushed, a worker without a gradient counting
    as zeros (DDP's ``find_unused_parameters``); a key no worker had a gradient for is not stepped."""

    name = "bsp"

    def expected(self, state: KeyState) -> set[int]:
        """The workers whose pushes the key's current step waits for."""
        if not self.since:
            return self.live
        return {w for w in self.live if self.since.get(w, 0) <= state.version}

    def _complete(self, state: KeyState) -> Completed | None:
        expected = self.expected(state)
        state.drain(expected | state.pushed)
        if state.pushed and expected <= state.pushed and not state.waiting:
            return state, state.take_aggregate()
        return None

    def join(self, worker: int, step: int, states: Iterable[KeyState]) -> tuple[int, list[Completed]]:
        states = list(states)
        start = max([step] + [s.version + (1 if s.pushed else 0) for s in states])
        self.live.add(worker)
        self.clock[worker] = self.since[worker] = start
        updates = []
        for state in states:  # a step that waited only for this worker (asked for earlier) completes
            if state.pushed and worker not in state.pushed:
                done = self._complete(state)
                if done is not None:
                    updates.append(done)
        return start, updates

    def check_push(self, state: KeyState, worker: int, step: int) -> bool:
        if step < state.version or worker in state.pushed or step < self.since.get(worker, 0):
            return False
        if step > state.version:
            raise ProtocolError(
                ErrorCode.STEP_AHEAD,
                f"push of {state.label()} for step {step} from worker {worker}, but the server aggregates step "
                f"{state.version}: pull step {state.version + 1} before pushing the next step",
            )
        return True

    def push(self, state: KeyState, worker: int, step: int, grad: torch.Tensor | None, hp: dict[str, Any] | None,
             owned: bool = True) -> Aggregate | None:
        expected = self.expected(state)
        if worker not in expected:
            return None
        if len(expected) == 1 and not state.pushed:  # nothing to sum: the received buffer itself, no accumulator
            hold, state.hold = state.hold, False
            return Aggregate(grad, hp, hold)
        state.contribute(worker, grad, hp, [worker] if self.arrival else expected | state.pushed, owned)
        if expected <= state.pushed and not state.waiting:
            return state.take_aggregate()
        return None

    def pull_ready(self, state: KeyState, worker: int, step: int) -> bool:
        return state.initialized and state.version >= step

    def pull_waiting_for(self, state: KeyState, worker: int, step: int) -> str:
        if not state.initialized:
            return f"{state.label()} is not initialised yet (rank 0 sends the initial values)"
        missing = sorted(self.expected(state) - state.pushed)
        return (
            f"{state.label()} is at version {state.version}, the pull wants {step}; step {state.version} has pushes "
            f"from workers {sorted(state.pushed)} and waits for workers {missing}"
        )

    def leave(self, worker: int, states: Iterable[KeyState]) -> list[Completed]:
        """A worker left or failed: what it pushed to a step counts; a step that waited only for it completes."""
        super().leave(worker, states)
        updates = []
        for state in states:
            if state.pushed:
                done = self._complete(state)
                if done is not None:
                    updates.append(done)
        return updates


class ASP(Consistency):
    name = "asp"

    def check_push(self, state: KeyState, worker: int, step: int) -> bool:
        last = state.last_step.get(worker, -1)
        if step <= last:
            return False
        if step > self.furthest(worker, last) + self.max_jump:  # one push must not poison the worker's next ones
            raise ProtocolError(
                ErrorCode.STEP_AHEAD,
                f"push of {state.label()} for step {step} from worker {worker}, whose furthest step is "
                f"{self.furthest(worker, last)}: a step moves forward by at most {self.max_jump} at a time "
                "(--max-pending: what a worker can have in flight)",
            )
        return True

    def push(self, state: KeyState, worker: int, step: int, grad: torch.Tensor | None, hp: dict[str, Any] | None,
             owned: bool = True) -> Aggregate | None:
        return None if grad is None else Aggregate(grad, hp, False)

    def applied(self, state: KeyState, worker: int, step: int) -> None:
        state.last_step[worker] = step
        if step > self.reached.get(worker, -1):
            self.reached[worker] = step

    def pull_ready(self, state: KeyState, worker: int, step: int) -> bool:
        return state.initialized

    def pull_waiting_for(self, state: KeyState, worker: int, step: int) -> str:
        return f"{state.label()} is not initialised yet (rank 0 sends the initial values)"


class SSP(ASP):
    name = "ssp"

    def pull_ready(self, state: KeyState, worker: int, step: int) -> bool:
        return state.initialized and self.slowest() >= step - self.staleness

    def pull_waiting_for(self, state: KeyState, worker: int, step: int) -> str:
        if not state.initialized:
            return super().pull_waiting_for(state, worker, step)
        behind = {w: self.clock[w] for w in sorted(self.live) if self.clock[w] < step - self.staleness}
        return (
            f"worker {worker} at clock {step} (staleness {self.staleness}) waits for workers "
            + ", ".join(f"{w} at clock {c}" for w, c in behind.items())
        )


def make_consistency(mode: str, num_workers: int, staleness: int = 0, bsp_sum: str = "rank",
                     max_jump: int = MAX_STEP_JUMP) -> Consistency:
    mode = mode.lower()
    if mode not in MODES:
        raise ValueError(f"consistency mode {mode!r} is not one of {', '.join(MODES)}")
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    made = {"bsp": BSP, "asp": ASP, "ssp": SSP}[mode](num_workers, staleness, max_jump)
    made.arrival = bsp_sum == "arrival"
    return made
