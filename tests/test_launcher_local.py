"""`zps run` end to end: real processes on loopback; no process outlives the job, however it ends."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from .helpers import FOREVER, ROOT, finish, start, tagged_pids, wait_for_line, wait_for_no_tagged

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("mode", ["bsp", "asp", pytest.param("ssp", marks=pytest.mark.slow)])  # ssp: digits in
# the slow tier (CI's budget); test_consistency checks SSP's bound on a live cluster in the cluster tier
def test_digits_reaches_95_percent_and_leaves_no_process(tag: str, mode: str, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    # bsp: with CurveZMQ too; asp: fresh interpreters instead of the zygote's forks
    # ssp: a 3x straggler, so staleness is exercised
    extra = {"bsp": ["--secure"], "asp": ["--no-preload", "--log-level", "DEBUG"],
             "ssp": ["--staleness", "2", "--straggler", "1:3"]}[mode]
    script = ["examples/digits.py", "--epochs", "20", "--out", str(out)]
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
    if mode == "asp":
        assert "zps.launcher: zygote" not in text, text
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


def test_files_named_like_zps_packages_beside_the_script_do_not_shadow_them(tag: str, tmp_path: Path) -> None:
    """A user's ps.py, protocol.py, worker.py and launcher.py beside the script (and in the directory the job
    starts from): zps imports only zps.*, so the job still trains."""
    for name in ("ps", "protocol", "worker", "launcher"):
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the user\\'s {name}.py was imported')\n")
    script = tmp_path / "digits.py"
    script.write_text((ROOT / "examples" / "digits.py").read_text())
    out = tmp_path / "result.json"
    proc = start(
        tag, ["run", "--servers", "1", "--workers", "2", str(script), "--epochs", "2", "--out", str(out)], cwd=tmp_path
    )
    code, text = finish(proc, timeout=180)
    assert code == 0, text
    assert "was imported" not in text
    assert json.loads(out.read_text())["steps"] > 10


def test_a_job_optimizer_the_script_does_not_use_is_refused(tag: str) -> None:
    """--optimizer reaches scripts through zps.worker.build_optimizer; a script that builds another optimizer is
    refused, naming the setting, instead of silently training with its own."""
    proc = start(tag, ["run", "--workers", "1", "--optimizer", "adam:lr=0.001", FOREVER])
    code, text = finish(proc, timeout=120)
    assert code != 0, text
    assert "ZPS_OPTIMIZER" in text and "builds SGD" in text, text
    assert wait_for_no_tagged(tag, within=5) == []


@pytest.mark.parametrize(
    "option, words",
    [
        (["--codec", "nosuch"], "unknown codec 'nosuch'"),
        (["--pull-codec", "topk:ratio=x"], "ZPS_PULL_CODEC (--pull-codec)='topk:ratio=x'"),
        (["--optimizer", "sgd:lr"], "is not key=value"),
        (["--mode", "asp", "--staleness", "2"], "only applies to mode ssp"),
    ],
)
def test_bad_job_options_fail_before_anything_starts(tag: str, option: list[str], words: str) -> None:
    code, text = finish(start(tag, ["run", *option, FOREVER]), timeout=60)
    assert code == 2, text
    assert words in text and "Traceback" not in text, text
    assert tagged_pids(tag) == []  # (the launcher itself has exited) nothing was started
