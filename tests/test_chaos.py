"""``zps chaos``: random kills and pauses of a running job's roles, then the invariants.

The job trains tests/scripts/train_steps.py (BSP, Adam; each step's batch a function of (step, rank) only) with
every recovery zps has without replicas: a killed worker is replaced (``--on-worker-failure restart``), a killed
server restarts the job from its newest checkpoint (``--max-restarts``). Whatever is hit, the final parameters
must be those of the failure-free run, and nothing may be left running.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from zps.lab.chaos import Plan, parse_most, parse_range
from zps.launcher.cli import main as zps_main

from .helpers import ROOT, ZPS, finish, start, tagged_pids, wait_for_no_tagged

SCRIPT = str(ROOT / "tests" / "scripts" / "train_steps.py")
SAME = str(ROOT / "tests" / "scripts" / "same_params.py")
STEPS = 100
JOB = ["run", "--servers", "2", "--workers", "3", "--mode", "bsp"]
TRAIN = [SCRIPT, "--steps", str(STEPS), "--step-time", "0.02"]


# -- the plan (unit) ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_ranges_parse_and_bad_ones_are_named() -> None:
    assert parse_range("0.5..2") == (0.5, 2.0)
    assert parse_range("3", int) == (3, 3)
    for bad in ("2..1", "a..b", "-1..2", "1..x"):
        with pytest.raises(ValueError, match="expected"):
            parse_range(bad)


@pytest.mark.unit
def test_the_same_seed_plans_the_same_actions_and_steps_come_in_order() -> None:
    plan = Plan(kills=12, roles=("worker", "server"), signal="mix", at_steps=(5, 90), seed=3)
    first, again = plan.actions(), plan.actions()
    assert first == again
    steps = [a.step for a in first if a.step is not None]
    assert len(steps) == 12 and steps == sorted(steps) and all(5 <= s <= 90 for s in steps)
    assert {a.role for a in first} == {"worker", "server"} and {a.how for a in first} == {"kill", "stop"}
    assert all((a.pause > 0) == (a.how == "stop") for a in first)
    assert Plan(kills=12, roles=("worker", "server"), signal="mix", at_steps=(5, 90), seed=4).actions() != first
    timed = Plan(kills=3, every=(1.0, 2.0)).actions()
    assert all(a.step is None and 1.0 <= a.wait <= 2.0 and a.how == "kill" for a in timed)


@pytest.mark.unit
def test_most_caps_the_kills_of_a_role_and_an_impossible_cap_is_named() -> None:
    plan = Plan(kills=20, roles=("worker", "server"), at_steps=(5, 95), seed=1, most=(("server", 2),))
    assert sum(a.role == "server" for a in plan.actions()) == 2
    assert parse_most("server=2, worker=3") == (("server", 2), ("worker", 3))
    with pytest.raises(ValueError, match="leaves nothing to kill"):
        Plan(kills=3, roles=("server",), most=(("server", 2),)).actions()
    with pytest.raises(ValueError, match="expected ROLE=N"):
        parse_most("server")


@pytest.mark.unit
@pytest.mark.parametrize("args, problem", [
    (["--kills", "0"], "--kills 0: at least 1"),
    (["--kills", "2", "--roles", "worker,coordinator"], "--roles worker,coordinator"),
    (["--kills", "2", "--at-steps", "9..3"], "expected 0 <= A <= B"),
])
def test_bad_chaos_options_fail_before_anything_runs(args: list[str], problem: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert zps_main(["chaos", *args, "--", sys.executable, "-c", "raise SystemExit('must not run')"]) == 2
    assert problem in capsys.readouterr().err


# -- real jobs (cluster) ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The failure-free run's final parameters."""
    out = tmp_path_factory.mktemp("reference") / "final.safetensors"
    tag = f"chaos-ref-{os.getpid()}"
    try:
        code, text = finish(start(tag, [*JOB, *TRAIN, "--out", str(out)]), timeout=180)
        assert code == 0, text
        yield out
    finally:
        assert wait_for_no_tagged(tag, within=10) == []


def chaos(tag: str, tmp_path: Path, chaos_args: list[str], job_args: list[str],
          timeout: float = 240) -> tuple[int, str, list[dict]]:
    """``zps chaos CHAOS_ARGS -- zps run JOB_ARGS``: its exit code, output and log."""
    log = tmp_path / "chaos.jsonl"
    code, text = finish(start(tag, ["chaos", *chaos_args, "--log", str(log), "--", *ZPS, *JOB, *job_args]),
                        timeout=timeout)
    assert wait_for_no_tagged(tag, within=10) == [], text
    return code, text, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.cluster
def test_kills_and_pauses_of_workers_and_servers_leave_the_failure_free_result(
        tag: str, tmp_path: Path, reference: Path) -> None:
    plan = ["--kills", "6", "--roles", "worker,server", "--signal", "mix", "--at-steps", "10..85", "--seed", "5"]
    hits = Plan(kills=6, roles=("worker", "server"), signal="mix", at_steps=(10, 85), seed=5).actions()
    assert {a.role for a in hits} == {"worker", "server"} and {a.how for a in hits} == {"kill", "stop"}
    final = tmp_path / "final.safetensors"
    code, text, log = chaos(tag, tmp_path, [*plan, "--check", f"{sys.executable} {SAME} {final} {reference}"],
                            ["--on-worker-failure", "restart", "--max-restarts", "20", "--checkpoint-dir",
                             str(tmp_path / "ckpt"), "--checkpoint-every", "5", *TRAIN, "--out", str(final)])
    assert code == 0, text
    actions = [e for e in log if "action" in e]
    assert len(actions) == 6 and all(e["pid"] > 0 for e in actions), log
    assert [(e["role"], e["action"]) for e in actions] == [(a.role, a.how) for a in hits], log
    verdicts = {e["verdict"]: e["ok"] for e in log if "verdict" in e}
    assert verdicts == {"exit code": True, "actions": True, "no process left": True, "--check": True}, log
    assert "largest difference" in text and "every invariant held" in text, text


@pytest.mark.cluster
def test_a_job_that_does_not_survive_its_kills_is_reported_as_such(tag: str, tmp_path: Path) -> None:
    planned = [a.step for a in Plan(kills=2, roles=("server",), at_steps=(15, 95), seed=6).actions()]
    assert planned == [25, 88]  # the job has stopped long before its progress could reach the second
    code, text, log = chaos(tag, tmp_path, ["--kills", "2", "--roles", "server", "--at-steps", "15..95", "--seed", "6"],
                            TRAIN)
    assert code == 1, text
    verdicts = {e["verdict"]: (e["ok"], e["detail"]) for e in log if "verdict" in e}
    assert verdicts["exit code"] == (False, "137 (expected 0)"), log
    assert verdicts["actions"][0] is False and "1 of 2 done" in verdicts["actions"][1], log
    assert verdicts["no process left"][0] is True, log
    assert "FAIL exit code: 137" in text and tagged_pids(tag) == []


@pytest.mark.slow
def test_twenty_random_kills_of_servers_and_workers(tag: str, tmp_path: Path, reference: Path) -> None:
    final = tmp_path / "final.safetensors"
    code, text, log = chaos(tag, tmp_path, ["--kills", "20", "--roles", "worker,server", "--at-steps", "5..95",
                                            "--seed", "11", "--check", f"{sys.executable} {SAME} {final} {reference}"],
                            ["--on-worker-failure", "restart", "--max-restarts", "40", "--checkpoint-dir",
                             str(tmp_path / "ckpt"), "--checkpoint-every", "5", *TRAIN, "--out", str(final)],
                            timeout=600)
    assert code == 0, text
    assert sum("action" in e for e in log) == 20 and all(e["ok"] for e in log if "verdict" in e), log


@pytest.mark.slow
def test_twenty_random_kills_with_replicated_servers(tag: str, tmp_path: Path) -> None:
    """The issue's chaos run: 20 kills of servers (2 of the 3: --replicas 1, and zps chaos kills the next server only
    once the previous one's chunks are re-replicated) and workers (replaced with their rank), no checkpoint: the job
    never restarts, and ends with the failure-free result."""
    job = ["--servers", "3", "--workers", "2", "--replicas", "1"]
    ref = tmp_path / "reference.safetensors"
    code, text = finish(start(tag, ["run", *job, *TRAIN, "--out", str(ref)]), timeout=240)
    assert code == 0, text
    final = tmp_path / "final.safetensors"
    log = tmp_path / "chaos.jsonl"
    code, text = finish(start(tag, ["chaos", "--kills", "20", "--roles", "worker,server", "--most", "server=2",
                                    "--at-steps", "5..95", "--seed", "7", "--log", str(log), "--check",
                                    f"{sys.executable} {SAME} {final} {ref}", "--", *ZPS, "run", *job,
                                    "--on-worker-failure", "restart", "--max-restarts", "40", *TRAIN, "--out",
                                    str(final)]), timeout=600)
    assert code == 0, text
    events = [json.loads(line) for line in log.read_text().splitlines()]
    actions = [e for e in events if "action" in e]
    assert len(actions) == 20 and sum(e["role"] == "server" for e in actions) == 2, events
    assert "FAILOVER" in text and "RE-REPLICATED" in text and all(e["ok"] for e in events if "verdict" in e), events
    assert wait_for_no_tagged(tag, within=10) == []
