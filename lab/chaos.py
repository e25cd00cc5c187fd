"""``zps chaos``: kill or pause a running job's roles at random, repeatedly, then check what must still hold.

    zps chaos --kills 20 --roles worker,server --at-steps 5..180 --seed 1 \\
        --check "python compare.py final.safetensors reference.safetensors" -- zps run ... script.py

The command (normally ``zps run`` or ``zps launch``) runs as a child with its output passed through. The harness
reads the coordinator's address from the line the launcher prints at start (again after a restart of the whole
job), asks it for the members (role, rank, pid, step) as ``zps top`` does, and at each chosen moment sends a live
member of the chosen roles ``SIGKILL``, or ``SIGSTOP`` and, after a pause, ``SIGCONT``. Moments are the job's
progress (``--at-steps A..B``: N steps drawn at random in that range, by the furthest step any worker reported) or
time (``--every A..B`` seconds). Same seed, same choices (which roles, which ranks, which moments); which process
a choice hits depends on who is alive then.

When the command ends, the invariants are checked and each is printed with its verdict:

- the command exited 0 (``--expect-exit``);
- every planned action happened (a job that ended first says the run was too short for the plan);
- no process of the run is left (every process started under the harness carries a marker in its environment;
  the same walk finds the shared-memory segments, sealed memfds that live exactly as long as a process holds them);
- ``--check CMD`` exits 0 (e.g. the final parameters against a failure-free run's).

Every action and verdict is also written as JSON lines (``--log FILE``). The exit code is 0 only when every
invariant holds. Kills reach processes on this host only (``zps run``, or the local part of ``zps launch``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from zps.protocol import security
from zps.protocol.config import ConfigError
from zps.telemetry.top import StatusClient, Unreachable

MARK = "ZPS_CHAOS_RUN"  # the environment variable every process of a run inherits
ROLES = ("worker", "server")
SIGNALS = ("kill", "stop", "mix")
POLL = 0.05  # seconds between status requests while waiting for the next moment
LEFTOVER_WAIT = 10.0  # seconds the processes of a run get to be gone after the command exited
_COORDINATOR_LINE = re.compile(r"coordinator at (\S+:\d+)")


def parse_range(text: str, kind: Callable[[str], Any] = float) -> tuple[Any, Any]:
    """``"A..B"`` (or one number, ``A..A``) as ``(A, B)`` with ``0 <= A <= B``; ValueError naming the problem."""
    low, sep, high = text.partition("..")
    try:
        a, b = kind(low), kind(high if sep else low)
    except ValueError:
        raise ValueError(f"{text!r}: expected A..B, two numbers") from None
    if not 0 <= a <= b:
        raise ValueError(f"{text!r}: expected 0 <= A <= B")
    return a, b


def parse_most(text: str) -> tuple[tuple[str, int], ...]:
    """``"server=2,worker=5"`` as ``(("server", 2), ("worker", 5))``; ValueError naming the problem."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, count = part.partition("=")
        if not sep or not count.strip().isdigit():
            raise ValueError(f"--most {part!r}: expected ROLE=N")
        out.append((role.strip(), int(count)))
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """What to do: ``kills`` actions on ``roles``, at progress steps or after time intervals."""

    kills: int
    roles: tuple[str, ...] = ("worker",)
    signal: str = "kill"  # kill | stop | mix
    at_steps: tuple[int, int] | None = None
    every: tuple[float, float] = (1.0, 3.0)
    pause: tuple[float, float] = (0.2, 1.0)  # SIGSTOP lasts this long
    seed: int = 0
    most: tuple[tuple[str, int], ...] = ()  # (role, N): at most N kills of that role (e.g. servers: --replicas R)

    def __post_init__(self) -> None:
        if self.kills < 1:
            raise ValueError(f"--kills {self.kills}: at least 1")
        bad = [r for r in self.roles if r not in ROLES]
        if bad or not self.roles:
            raise ValueError(f"--roles {','.join(self.roles)}: each of {', '.join(ROLES)}")
        if self.signal not in SIGNALS:
            raise ValueError(f"--signal {self.signal}: one of {', '.join(SIGNALS)}")
        for role, count in self.most:
            if role not in self.roles or count < 0:
                raise ValueError(f"--most {role}={count}: a role of --roles and a count >= 0")

    def actions(self) -> list[Action]:
        """The planned actions, in order; the same for the same seed."""
        rng = random.Random(self.seed)
        steps = (sorted(rng.randint(*self.at_steps) for _ in range(self.kills)) if self.at_steps is not None
                 else [None] * self.kills)
        out: list[Action] = []
        limits = dict(self.most)
        for step in steps:
            how = self.signal if self.signal != "mix" else rng.choice(("kill", "stop"))
            kills = {r: sum(a.role == r and a.how == "kill" for a in out) for r in self.roles}
            roles = [r for r in self.roles if how != "kill" or kills[r] < limits.get(r, self.kills)]
            if not roles:
                raise ValueError(f"--most {','.join(f'{r}={n}' for r, n in self.most)} leaves nothing to kill for "
                                 f"{self.kills} kills: add a role or raise a limit")
            out.append(Action(role=rng.choice(roles), pick=rng.random(), how=how, step=step,
                              wait=rng.uniform(*self.every) if step is None else 0.0,
                              pause=rng.uniform(*self.pause) if how == "stop" else 0.0))
        return out


@dataclass
class Action:
    """One planned action and, once done, what it hit."""

    role: str
    pick: float  # which live member of the role: index = int(pick * count)
    how: str  # kill | stop
    step: int | None  # at this progress step; else after ``wait`` seconds
    wait: float
    pause: float
    done_at: float | None = None  # seconds since the start
    rank: int | None = None
    pid: int | None = None
    progress: int | None = None  # the furthest worker step when it was done


@dataclass
class Verdict:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    """How a chaos run went: the command's exit code, the actions and every invariant's verdict."""

    code: int
    actions: list[Action]
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.verdicts)


def marked_pids(mark: str, variable: str = MARK) -> list[int]:
    """Live processes (not zombies: their environment reads empty) whose environment carries ``variable=mark``."""
    needle = f"{variable}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def segments_held(pids: Sequence[int]) -> int:
    """Shared-memory segments (zps's memfds) that these processes still map."""
    count = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                count += sum("memfd:zps-segment" in line for line in f)
        except OSError:
            continue
    return count


class Chaos:
    """Runs ``command`` under ``plan`` and checks the invariants (:meth:`run`)."""

    def __init__(self, plan: Plan, command: Sequence[str], out: IO[str] = sys.stdout, check: str | None = None,
                 expect_exit: int = 0, log_file: str | None = None, secrets: security.Secrets | None = None,
                 timeout: float = 3600.0) -> None:
        self.plan, self.command, self.out, self.check = plan, list(command), out, check
        self.expect_exit, self.log_file, self.secrets, self.timeout = expect_exit, log_file, secrets, timeout
        self.mark = uuid.uuid4().hex
        self.coordinator: str | None = None
        self._client: StatusClient | None = None
        self._progress = 0  # the furthest step any worker reported, over restarts of the whole job
        self._status: dict[str, Any] = {}  # the coordinator's newest answer
        self._server_kills = 0  # done so far: the next one waits until they are failed over and re-replicated
        self._lock = threading.Lock()
        self._log: IO[str] | None = None

    def say(self, text: str) -> None:
        with self._lock:
            self.out.write(f"[zps chaos] {text}\n")
            self.out.flush()

    def _record(self, event: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(event) + "\n")
            self._log.flush()

    def run(self) -> Report:
        actions = self.plan.actions()
        self._log = open(self.log_file, "w") if self.log_file else None
        started = time.monotonic()
        proc = subprocess.Popen(self.command, env={**os.environ, MARK: self.mark}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        reader = threading.Thread(target=self._pass_through, args=(proc,), daemon=True)
        reader.start()
        seen: set[int] = set()
        paused: list[tuple[float, int]] = []  # (when to resume, pid)
        try:
            pending = list(actions)
            due = started + (pending[0].wait if pending else 0.0)
            while proc.poll() is None and time.monotonic() - started < self.timeout:
                members = self._members()
                seen.update(m["pid"] for m in members if m.get("pid"))
                paused = self._resume(paused)
                if pending and self._is_due(pending[0], due):
                    action = pending.pop(0)
                    if self._act(action, members, started):
                        if action.how == "stop":
                            paused.append((time.monotonic() + action.pause, int(action.pid or 0)))
                    else:
                        pending.insert(0, action)  # nobody to hit yet: retried at the next poll
                    if pending and action.done_at is not None:
                        due = time.monotonic() + pending[0].wait
                try:
                    proc.wait(POLL)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                self.say(f"the command ran past --timeout {self.timeout:.0f}s: stopping it")
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            for _, pid in paused:
                _signal(pid, signal.SIGCONT)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
            reader.join(timeout=5)
            if self._client is not None:
                self._client.close()
        report = Report(code, actions)
        report.verdicts = self._verdicts(code, actions, seen)
        for v in report.verdicts:
            self.say(f"{'ok  ' if v.ok else 'FAIL'} {v.name}: {v.detail}")
            self._record({"verdict": v.name, "ok": v.ok, "detail": v.detail})
        if self._log is not None:
            self._log.close()
        return report

    # -- the job's view ----------------------------------------------------------------------------------------
    def _pass_through(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lock:
                self.out.write(line)
                self.out.flush()
            found = _COORDINATOR_LINE.search(line)
            if found:
                with self._lock:
                    self.coordinator = found.group(1)

    def _members(self) -> list[dict[str, Any]]:
        """The running members the coordinator knows (empty while there is none to ask)."""
        with self._lock:
            coordinator = self.coordinator
        if coordinator is None:
            return []
        if self._client is None or self._client.coordinator != coordinator:
            if self._client is not None:
                self._client.close()
            self._client = StatusClient(coordinator, self.secrets)
        try:
            status = self._client.status(wait=1.0)
        except Unreachable:
            return []
        self._status = status
        members = [m for m in status.get("members", []) if isinstance(m, dict)]
        steps = [int(m.get("step") or 0) for m in members if m.get("role") == "worker"]
        self._progress = max([self._progress, *steps])
        if status.get("state") != "running":
            return []
        return [m for m in members if m.get("state") == "running"]

    def _is_due(self, action: Action, due: float) -> bool:
        if action.step is not None:
            return self._progress >= action.step
        return time.monotonic() >= due

    def _act(self, action: Action, members: list[dict[str, Any]], started: float) -> bool:
        alive = sorted((m for m in members if m.get("role") == action.role and _alive(int(m.get("pid") or 0))),
                       key=lambda m: int(m["rank"]))
        if not alive:
            return False
        if action.role == "server" and action.how == "kill" and not self._replicated(actions_done=self._server_kills):
            return False  # the previous server kill is not failed over and re-replicated yet: waits for it
        target = alive[min(int(action.pick * len(alive)), len(alive) - 1)]
        action.rank, action.pid, action.progress = int(target["rank"]), int(target["pid"]), self._progress
        action.done_at = round(time.monotonic() - started, 3)
        sig = signal.SIGKILL if action.how == "kill" else signal.SIGSTOP
        _signal(action.pid, sig)
        if action.role == "server" and action.how == "kill":
            self._server_kills += 1
        what = "SIGKILL" if action.how == "kill" else f"SIGSTOP for {action.pause:.2f}s"
        self.say(f"{what} to {action.role} {action.rank} (pid {action.pid}) at {action.done_at:.1f}s, step "
                 f"{self._progress}")
        self._record({"t": action.done_at, "action": action.how, "role": action.role, "rank": action.rank,
                      "pid": action.pid, "step": self._progress, "pause": action.pause or None})
        return True

    def _replicated(self, actions_done: int) -> bool:
        """--replicas: every server killed so far is failed over and each chunk has its copies back (a job
        without replicas has nothing to wait for: a server kill restarts it from its checkpoint)."""
        if not self._status.get("replicas"):
            return True
        return (len(self._status.get("dead_servers", [])) >= actions_done
                and not self._status.get("under_replicated"))

    def _resume(self, paused: list[tuple[float, int]]) -> list[tuple[float, int]]:
        now = time.monotonic()
        for when, pid in paused:
            if when <= now:
                _signal(pid, signal.SIGCONT)
        return [(when, pid) for when, pid in paused if when > now]

    # -- the invariants ------------------------------------------------------------------------------------------
    def _verdicts(self, code: int, actions: list[Action], seen: set[int]) -> list[Verdict]:
        done = sum(a.done_at is not None for a in actions)
        out = [Verdict("exit code", code == self.expect_exit, f"{code} (expected {self.expect_exit})"),
               Verdict("actions", done == len(actions),
                       f"{done} of {len(actions)} done" + ("" if done == len(actions) else
                                                           ": the job ended first; lengthen the run or move the "
                                                           "moments earlier"))]
        deadline = time.monotonic() + LEFTOVER_WAIT
        while (left := marked_pids(self.mark)) and time.monotonic() < deadline:
            time.sleep(0.1)  # polling the process table for exits, bounded by LEFTOVER_WAIT
        held = segments_held(left)
        alive_seen = sorted(p for p in seen if _alive(p))
        out.append(Verdict("no process left", not left and not alive_seen,
                           f"{len(seen)} members seen, none left" if not left and not alive_seen else
                           f"left: pids {sorted(set(left) | set(alive_seen))} (holding {held} shared-memory "
                           "segments)"))
        if self.check:
            result = subprocess.run(self.check, shell=True, capture_output=True, text=True)
            tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
            out.append(Verdict("--check", result.returncode == 0,
                               f"{_short(self.check)!r} exited {result.returncode}" + (f": {' | '.join(tail)}" if tail
                                                                               else "")))
        return out


def _short(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."


def _alive(pid: int) -> bool:
    """A live, not zombie, process."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def add_arguments(p: Any) -> None:
    p.add_argument("--kills", type=int, required=True, help="how many actions (kills or pauses) to take")
    p.add_argument("--roles", default="worker", help="comma-separated roles to hit: worker, server (default worker)")
    p.add_argument("--most", default="", metavar="ROLE=N,...",
                   help="at most N kills of ROLE, e.g. server=2 with --replicas 2 (pauses are not counted)")
    p.add_argument("--signal", default="kill", choices=SIGNALS,
                   help="kill: SIGKILL; stop: SIGSTOP then SIGCONT after --pause; mix: either, at random")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--at-steps", default=None, metavar="A..B",
                      help="act at steps drawn at random in A..B (the furthest step any worker reported)")
    when.add_argument("--every", default="1..3", metavar="A..B",
                      help="act after a random A..B seconds since the previous action (default 1..3)")
    p.add_argument("--pause", default="0.2..1", metavar="A..B", help="seconds a SIGSTOP lasts (default 0.2..1)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every random choice (default 0)")
    p.add_argument("--check", default=None, metavar="CMD",
                   help="a shell command run after the job; the run passes only if it exits 0")
    p.add_argument("--expect-exit", type=int, default=0, help="the command's expected exit code (default 0)")
    p.add_argument("--log", default=None, metavar="FILE", help="write every action and verdict as JSON lines")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the command is stopped")
    p.add_argument("--secrets", default=None, metavar="FILE", help="a --secure job's key file (as for zps top)")
    p.add_argument("cmd", nargs="+", metavar="COMMAND", help="after --: the job to run, e.g. -- zps run ... script.py")


def main(args: Any) -> int:
    """``zps chaos``: 0 when every invariant held, 1 when one did not, 2 for a bad option."""
    try:
        plan = Plan(kills=args.kills, roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()),
                    signal=args.signal, at_steps=parse_range(args.at_steps, int) if args.at_steps else None,
                    every=parse_range(args.every), pause=parse_range(args.pause), seed=args.seed,
                    most=parse_most(args.most))
    except ValueError as exc:
        print(f"zps chaos: error: {exc}", file=sys.stderr)
        return 2
    try:
        secrets = security.Secrets.from_json(open(args.secrets).read(), args.secrets) if args.secrets else None
    except (OSError, ConfigError) as exc:
        print(f"zps chaos: cannot read --secrets {args.secrets}: {exc}", file=sys.stderr)
        return 2
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    chaos = Chaos(plan, command, check=args.check, expect_exit=args.expect_exit, log_file=args.log,
                  secrets=secrets, timeout=args.timeout)
    chaos.say(f"{plan.kills} x {plan.signal} on {','.join(plan.roles)} "
              f"{'at steps ' + args.at_steps if args.at_steps else 'every ' + args.every + ' s'} (seed {plan.seed})"
              f": {shlex.join(command)}")
    report = chaos.run()
    chaos.say("every invariant held" if report.ok else "an invariant did not hold")
    return 0 if report.ok else 1


__all__ = ["Action", "Chaos", "Plan", "Report", "Verdict", "add_arguments", "main", "marked_pids", "parse_most",
           "parse_range"]
