"""`zps run` end to end: real processes on loopback; no process outlives the job, however it ends."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cluster import finish, tagged_pids, wait_for_line, wait_for_no_tagged

ROOT = Path(__file__).resolve().parents[1]
ZPS = [sys.executable, "-m", "zps.launcher.cli"]
FOREVER = str(ROOT / "tests" / "scripts" / "train_forever.py")


def start(tag: str, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "ZPS_TEST_TAG": tag}
    return subprocess.Popen(ZPS + args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("mode", ["bsp", "asp", "ssp"])
def test_digits_reaches_95_percent_and_leaves_no_process(tag: str, mode: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    extra = ["--staleness", "2"] if mode == "ssp" else []
    script = ["examples/digits.py", "--epochs", "20", "--out", str(out)]
    if mode == "ssp":
        script += ["--slow", "0.002", "--slow-rank", "1"]  # a straggler, so staleness is exercised
    proc = start(tag, ["run", "--servers", "2", "--workers", "2", "--mode", mode, *extra, *script])
    code, text = finish(proc, timeout=240)
    assert code == 0, text
    result = json.loads(out.read_text())
    assert result["test_accuracy"] >= 0.95, result
    assert (result["mode"], result["workers"], result["servers"]) == (mode, 2, 2)
    assert result["steps"] > 100
    if mode == "ssp":
        assert 0 <= result["max_served_gap"] <= 2
    assert "[worker 0]" in text and "[server 1]" in text
    assert wait_for_no_tagged(tag, within=5) == []


def test_a_crashing_worker_ends_the_job_with_its_exit_code(tag: str) -> None:
    proc = start(tag, ["run", "--servers", "2", "--workers", "3", FOREVER, "--crash-rank", "1", "--crash-after", "5"])
    started = time.monotonic()
    code, text = finish(proc, timeout=60)
    assert code == 3, text
    assert time.monotonic() - started < 30
    assert "worker 1 exited with code 3" in text
    assert wait_for_no_tagged(tag, within=5) == []


def test_ctrl_c_ends_every_process(tag: str) -> None:
    proc = start(tag, ["run", "--servers", "2", "--workers", "2", FOREVER])
    wait_for_line(proc, "TRAINING", timeout=60)
    assert len(tagged_pids(tag)) >= 5  # the launcher, 2 servers, 2 workers
    proc.send_signal(signal.SIGINT)
    code, text = finish(proc, timeout=30)
    assert code == 128 + signal.SIGINT, text
    assert wait_for_no_tagged(tag, within=5) == []


def test_killing_the_launcher_takes_its_children_along(tag: str) -> None:
    proc = start(tag, ["run", "--servers", "1", "--workers", "2", FOREVER])
    wait_for_line(proc, "TRAINING", timeout=60)
    proc.kill()  # SIGKILL: no chance to clean up; the children must die by themselves
    proc.wait(timeout=10)
    assert wait_for_no_tagged(tag, within=10) == []


def test_missing_script_is_a_clear_error(tag: str) -> None:
    code, text = finish(start(tag, ["run", "nosuchscript.py"]), timeout=30)
    assert code == 2
    assert "nosuchscript.py" in text and "not found" in text
