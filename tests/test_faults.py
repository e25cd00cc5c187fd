"""The failure model, row by row: real processes killed mid-step, over several cluster shapes.

Under `zps run` the launcher sees the death and ends the job; under a scheduler (`zps node`, nobody supervising)
the coordinator's heartbeats notice it and every other process fails, naming the dead one. Either way the job ends
within a bounded time and leaves no process behind.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cluster import finish, role_pid, wait_for_line, wait_for_no_tagged
from .sshd import free_port
from .test_launcher_node import Procs

ROOT = Path(__file__).resolve().parents[1]
FOREVER = str(ROOT / "tests" / "scripts" / "train_forever.py")


@pytest.mark.parametrize("victim", ["server", "worker"])
@pytest.mark.parametrize("servers, workers", [(1, 2), (2, 3)])
def test_zps_run_ends_when_any_role_is_killed(tag: str, victim: str, servers: int, workers: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "zps.launcher.cli", "run", "--servers", str(servers), "--workers", str(workers), FOREVER],
        cwd=ROOT, env={**os.environ, "ZPS_TEST_TAG": tag}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
    common = {"ZPS_COORDINATOR": f"127.0.0.1:{free_port()}", "ZPS_NUM_SERVERS": "2", "ZPS_NUM_WORKERS": "2",
              "ZPS_TIMEOUT": "60", "ZPS_HEARTBEAT_TIMEOUT": "2"}
    procs.start("coordinator", {**common, "ZPS_ROLE": "coordinator"}, ["node"])
    for rank in range(2):
        procs.start(f"server{rank}", {**common, "ZPS_ROLE": "server", "ZPS_RANK": str(rank)}, ["node"])
        procs.start(f"worker{rank}", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": str(rank)}, ["node", FOREVER])
    deadline = time.monotonic() + 90
    while "TRAINING" not in procs.log("worker0"):  # the training loop is running (reading a file it writes)
        assert time.monotonic() < deadline, procs.logs()
        assert procs.procs["worker0"].poll() is None, procs.logs()
        time.sleep(0.1)
    dead = f"{victim}{1}"
    os.kill(role_pid(tag, victim, 1, exclude=(b"zps.launcher.ssh",)), signal.SIGKILL)
    started = time.monotonic()
    codes = procs.wait(timeout=45)
    assert time.monotonic() - started < 30
    assert codes[dead] == -signal.SIGKILL
    survivors = {name: code for name, code in codes.items() if name != dead}
    assert all(code != 0 for code in survivors.values()), f"{codes}\n{procs.logs()}"
    for name in survivors:
        assert f"{victim}:1" in procs.log(name), f"{name} does not name the dead {victim}:\n{procs.log(name)}"
    assert wait_for_no_tagged(tag, within=10) == []
