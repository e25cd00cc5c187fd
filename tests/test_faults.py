"""The failure model, row by row: real processes killed mid-step, over several cluster shapes.

Under `zps run` the launcher sees the death and ends the job; under a scheduler (`zps node`, nobody supervising)
the coordinator's heartbeats notice it and every other process fails, naming the dead one. Either way the job ends
within a bounded time and leaves no process behind.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from .helpers import FOREVER, Procs, finish, free_port, role_pid, start, wait_for_line, wait_for_no_tagged

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("victim, servers, workers", [("server", 1, 2), ("worker", 2, 3), ("server", 2, 3)])
def test_zps_run_ends_when_any_role_is_killed(tag: str, victim: str, servers: int, workers: int) -> None:
    proc = start(tag, ["run", "--servers", str(servers), "--workers", str(workers), FOREVER])
    wait_for_line(proc, "TRAINING", timeout=90)
    rank = (servers if victim == "server" else workers) - 1
    os.kill(role_pid(tag, victim, rank), signal.SIGKILL)
    started = time.monotonic()
    code, text = finish(proc, timeout=60)
    assert time.monotonic() - started < 30
    assert code == 128 + signal.SIGKILL, text
    assert f"{victim} {rank} was killed by SIGKILL" in text
    assert wait_for_no_tagged(tag, within=10) == []


@pytest.mark.parametrize("victim", ["server", "worker"])
def test_without_a_launcher_heartbeats_end_the_job_naming_the_dead(tag: str, tmp_path: Path, victim: str) -> None:
    """Scheduler mode: every role is its own `zps node`; kill one and nobody may hang."""
    procs = Procs(tag, tmp_path)
    servers, workers = (2, 1) if victim == "server" else (1, 2)  # two of the victim's role: it is rank 1
    common = {
        "ZPS_COORDINATOR": f"127.0.0.1:{free_port()}",
        "ZPS_NUM_SERVERS": str(servers),
        "ZPS_NUM_WORKERS": str(workers),
        "ZPS_TIMEOUT": "60",
        "ZPS_HEARTBEAT_TIMEOUT": "2",
    }
    procs.start("coordinator", {**common, "ZPS_ROLE": "coordinator"}, ["node"])
    for rank in range(servers):
        procs.start(f"server{rank}", {**common, "ZPS_ROLE": "server", "ZPS_RANK": str(rank)}, ["node"])
    for rank in range(workers):
        procs.start(f"worker{rank}", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": str(rank)}, ["node", FOREVER])
    deadline = time.monotonic() + 90
    while "TRAINING" not in procs.log("worker0"):  # the training loop is running (reading a file it writes)
        assert time.monotonic() < deadline, procs.logs()
        assert procs.procs["worker0"].poll() is None, procs.logs()
        time.sleep(0.1)
    dead = f"{victim}{1}"
    os.kill(role_pid(tag, victim, 1, exclude=(b"zps.launcher.remote",)), signal.SIGKILL)
    started = time.monotonic()
    codes = procs.wait(timeout=45)
    assert time.monotonic() - started < 30
    assert codes[dead] == -signal.SIGKILL
    survivors = {name: code for name, code in codes.items() if name != dead}
    assert all(code != 0 for code in survivors.values()), f"{codes}\n{procs.logs()}"
    for name in survivors:
        assert f"{victim}:1" in procs.log(name), f"{name} does not name the dead {victim}:\n{procs.log(name)}"
    assert wait_for_no_tagged(tag, within=10) == []


@pytest.mark.parametrize("how, runner", [("exit", "zps node"), ("raise", "python")])
def test_a_failing_worker_fails_the_job_instead_of_leaving_it(tag: str, tmp_path: Path, how: str, runner: str) -> None:
    """Scheduler mode, BSP: worker 1's script raises (or exits 3) mid-run, run by `zps node` or by plain `python`
    (its exit handler reports it). The job must fail naming worker 1, never go on averaging worker 0 alone."""
    procs = Procs(tag, tmp_path)
    common = {
        "ZPS_COORDINATOR": f"127.0.0.1:{free_port()}",
        "ZPS_NUM_SERVERS": "1",
        "ZPS_NUM_WORKERS": "2",
        "ZPS_TIMEOUT": "60",
        "ZPS_HEARTBEAT_TIMEOUT": "30",
    }  # no heartbeat may be what ends it
    crash = [FOREVER, "--crash-rank", "1", "--crash-after", "4", "--crash-how", how]
    procs.start("coordinator", {**common, "ZPS_ROLE": "coordinator"}, ["node"])
    procs.start("server", {**common, "ZPS_ROLE": "server", "ZPS_RANK": "0"}, ["node"])
    procs.start("worker0", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": "0"}, ["node", *crash])
    worker1 = {**common, "ZPS_ROLE": "worker", "ZPS_RANK": "1"}
    if runner == "python":
        procs.start("worker1", worker1, crash, command=[sys.executable, "-u"])
    else:
        procs.start("worker1", worker1, ["node", *crash])
    started = time.monotonic()
    codes = procs.wait(timeout=90)
    assert time.monotonic() - started < 60, procs.logs()
    assert codes["worker1"] == (3 if how == "exit" else 1), procs.logs()
    assert codes["worker0"] != 0 and codes["coordinator"] != 0 and codes["server"] != 0, f"{codes}\n{procs.logs()}"
    why = "RuntimeError: a bug in the training script" if how == "raise" else "exited with code 3"
    for name in ("coordinator", "worker0"):
        assert "worker:1" in procs.log(name) and "failed" in procs.log(name), procs.log(name)
    assert why in procs.log("coordinator"), procs.log("coordinator")
    assert wait_for_no_tagged(tag, within=10) == []
