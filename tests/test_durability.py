"""Durability with real processes: checkpoints, resume after the whole job was killed (bit for bit), resume onto
another number of servers, a server killed while it writes, automatic restarts, corrupt checkpoints refused.

Every job trains tests/scripts/train_steps.py (BSP, Adam): each step's batch depends on (step, rank) only, so an
interrupted and resumed job sees exactly the data of an uninterrupted one, and must end with the same bits.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from zps.protocol import checkpoint as ckpt

from .helpers import ROOT, finish, kill_tagged, role_pid, start, tagged_pids, wait_for_line, wait_for_no_tagged

pytestmark = pytest.mark.cluster

SCRIPT = str(ROOT / "tests" / "scripts" / "train_steps.py")
# three workers: a step's sum is in rank order (not arrival order), so a resumed run has the straight run's bits
JOB = ["run", "--servers", "2", "--workers", "3", "--checkpoint-every", "20"]


def zps_job(tag: str, *args: str, timeout: float = 240) -> str:
    """``zps ARGS...`` to the end; its output (it must exit 0)."""
    code, text = finish(start(tag, list(args)), timeout=timeout)
    assert code == 0, text
    assert wait_for_no_tagged(tag, within=10) == []
    return text


def tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of every part of a checkpoint, by file."""
    return {p.name: load_file(str(p)) for p in sorted(directory.glob("*.safetensors"))}


def by_parameter(directory: Path) -> dict[str, torch.Tensor]:
    """The servers' values and optimizer state of each parameter, whatever the servers cut it into:
    ``name`` and ``name/<state>`` for element-wise state, assembled in offset order."""
    manifest = ckpt.read_manifest(directory)
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for entry in manifest.body["servers"]:
        part = manifest.part("server", entry["rank"])
        for key in part.meta["keys"]:
            pieces.setdefault(key["name"], []).append((key["offset"], part.tensor(f"{key['key']}.param")))
            for state in key["state"]:
                value = part.tensor(f"{key['key']}.state.{state}")
                if value.dim():
                    pieces.setdefault(f"{key['name']}/{state}", []).append((key["offset"], value))
    return {name: torch.cat([t for _, t in sorted(found, key=lambda p: p[0])]) for name, found in pieces.items()}


def assert_same_bits(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for file in a:
        assert a[file].keys() == b[file].keys(), file
        for name in a[file]:
            if name == "rng.numpy":  # NumPy's global generator is seeded from the OS in every process: the script
                continue  # never seeds it, so two jobs hold different states (each resumes its own exactly)
            assert torch.equal(a[file][name], b[file][name]), f"{file}: {name} differs"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """60 steps without interruption, a checkpoint every 20: the reference every other run must match."""
    root = tmp_path_factory.mktemp("straight")
    tag = f"straight-{os.getpid()}"
    try:
        zps_job(
            tag,
            *JOB,
            "--checkpoint-dir",
            str(root / "ckpt"),
            SCRIPT,
            "--steps",
            "60",
            "--out",
            str(root / "final.safetensors"),
        )
    finally:
        kill_tagged(tag)
    assert [p.name for p in ckpt.complete(root / "ckpt")] == [f"ckpt-{s:09d}" for s in (20, 40, 60)]
    yield root


def test_resume_after_the_whole_job_was_killed_is_bit_for_bit(straight: Path, tag: str, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    job = [*JOB, "--checkpoint-dir", str(root)]
    proc = start(tag, [*job, SCRIPT, "--steps", "60", "--pause-after", "25"])
    wait_for_line(proc, "PAUSED", timeout=180)  # after step 25: checkpoint 20 was asked for and written
    deadline = time.monotonic() + 60
    while not (ckpt.directory(root, 20) / ckpt.MANIFEST).exists():
        assert time.monotonic() < deadline, "checkpoint 20 never completed"
        time.sleep(0.05)  # polling the file system for the coordinator's manifest, bounded
    for pid in tagged_pids(tag):  # kill -9 of every process, the launcher too: nothing can clean up
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert wait_for_no_tagged(tag, within=10) == []

    text = zps_job(tag, *job, "--resume", "latest", SCRIPT, "--steps", "60", "--out", str(tmp_path / "final.st"))
    assert "RESUMED at step 20: rank 0 at step 20" in text and "RESUMED at step 20: rank 1 at step 20" in text
    for step in (40, 60):  # every parameter, every optimizer state tensor, every worker's part
        assert_same_bits(tensors(ckpt.directory(straight / "ckpt", step)), tensors(ckpt.directory(root, step)))
    assert_same_bits(
        {"final": load_file(str(straight / "final.safetensors"))}, {"final": load_file(str(tmp_path / "final.st"))}
    )


def test_resume_with_top_k_and_error_feedback_is_bit_for_bit(tag: str, tmp_path: Path) -> None:
    """The workers' error-feedback residuals are part of the checkpoint: without them the resumed run would
    drift from the uninterrupted one at its first step."""
    codec = ["--codec", "topk:ratio=0.1", "--error-feedback", "--compress-min", "16"]
    zps_job(tag, *JOB, *codec, "--checkpoint-dir", str(tmp_path / "a"), SCRIPT, "--steps", "40")
    assert any(n.startswith("residual.") for n in tensors(ckpt.directory(tmp_path / "a", 20))["worker-1.safetensors"])
    shutil.copytree(ckpt.directory(tmp_path / "a", 20), ckpt.directory(tmp_path / "b", 20))
    zps_job(tag, *JOB, *codec, "--checkpoint-dir", str(tmp_path / "b"), "--resume", "latest", SCRIPT, "--steps", "40")
    assert_same_bits(tensors(ckpt.directory(tmp_path / "a", 40)), tensors(ckpt.directory(tmp_path / "b", 40)))


def test_resume_onto_three_servers_continues_the_two_server_run(straight: Path, tag: str, tmp_path: Path) -> None:
    """The plan is cut again for three servers; each loads exactly the ranges it now owns."""
    shutil.copytree(ckpt.directory(straight / "ckpt", 20), ckpt.directory(tmp_path / "ckpt", 20))
    job = [
        "run",
        "--servers",
        "3",
        "--workers",
        "3",
        "--checkpoint-every",
        "20",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--resume",
        "latest",
    ]
    zps_job(tag, *job, SCRIPT, "--steps", "60", "--out", str(tmp_path / "final.st"))
    assert len(ckpt.read_manifest(ckpt.directory(tmp_path / "ckpt", 40)).body["servers"]) == 3
    for step in (40, 60):
        expected, got = (by_parameter(ckpt.directory(r, step)) for r in (straight / "ckpt", tmp_path / "ckpt"))
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    final, reference = load_file(str(tmp_path / "final.st")), load_file(str(straight / "final.safetensors"))
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], atol=1e-6, rtol=0, msg=name)


def test_max_restarts_recovers_from_a_server_killed_mid_run(straight: Path, tag: str, tmp_path: Path) -> None:
    """A server killed at step 30 of 60: the launcher restarts the job from checkpoint 20, and the final model
    equals the uninterrupted run's (BSP replays the same steps on the same data)."""
    proc = start(
        tag,
        [
            *JOB,
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
            "--max-restarts",
            "2",
            SCRIPT,
            "--steps",
            "60",
            "--out",
            str(tmp_path / "final.st"),
        ],
    )
    wait_for_line(proc, "[worker 0] STEP 30", timeout=180)
    os.kill(role_pid(tag, "server", 0), signal.SIGKILL)
    code, text = finish(proc, timeout=240)
    assert code == 0, text
    assert "restart 1 of 2 after: server 0 was killed by SIGKILL; resuming from" in text, text
    final, reference = load_file(str(tmp_path / "final.st")), load_file(str(straight / "final.safetensors"))
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], atol=1e-6, rtol=0, msg=name)
    assert wait_for_no_tagged(tag, within=10) == []


def test_a_server_killed_while_writing_leaves_the_previous_checkpoint_loadable(tag: str, tmp_path: Path) -> None:
    """A big model (writes take a while): stop server 0 the moment its part of the second checkpoint is being
    written, then kill it. The partial checkpoint is never taken for a complete one; the first still loads."""
    root = tmp_path / "ckpt"
    proc = start(
        tag,
        [
            "run",
            "--servers",
            "2",
            "--workers",
            "1",
            "--checkpoint-dir",
            str(root),
            "--checkpoint-every",
            "2",
            SCRIPT,
            "--steps",
            "100",
            "--wide",
            "96",
        ],
    )
    deadline = time.monotonic() + 180
    while not (ckpt.directory(root, 2) / ckpt.MANIFEST).exists():  # a complete checkpoint to fall back on
        assert time.monotonic() < deadline and proc.poll() is None, "checkpoint 2 never completed"
        time.sleep(0.002)  # polling the file system for the coordinator's manifest, bounded
    while not (writing := sorted(root.glob("ckpt-*/.server-0.safetensors.*.tmp"))):  # a later one being written
        assert time.monotonic() < deadline and proc.poll() is None, "server 0 never wrote a later checkpoint"
        time.sleep(0.002)  # polling the file system for the temporary file, bounded
    server = role_pid(tag, "server", 0)
    os.kill(server, signal.SIGSTOP)  # mid-write
    os.kill(server, signal.SIGKILL)
    partial = writing[-1].parent
    code, text = finish(proc, timeout=120)
    assert code == 128 + signal.SIGKILL, text
    assert wait_for_no_tagged(tag, within=10) == []
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.read_manifest(partial)
    newest = ckpt.resolve(root)
    number = ckpt.number(partial)
    assert number is not None and 2 <= newest.checkpoint < number, (newest.checkpoint, partial)
    for entry in newest.body["servers"] + newest.body["workers"]:
        part = newest.part("server" if entry in newest.body["servers"] else "worker", entry["rank"])
        assert all(part.tensor(name).numel() >= 0 for name in part.names)  # every tensor reads back whole


def test_a_damaged_or_foreign_checkpoint_is_refused_before_anything_trains(
    straight: Path, tag: str, tmp_path: Path
) -> None:
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt.directory(straight / "ckpt", 20), ckpt.directory(copy, 20))
    part = ckpt.directory(copy, 20) / "server-1.safetensors"
    part.write_bytes(part.read_bytes()[:-100])
    code, text = finish(start(tag, [*JOB, "--checkpoint-dir", str(copy), "--resume", "latest", SCRIPT]), timeout=60)
    assert code == 2 and "server-1.safetensors" in text and "truncated" in text, text
    assert "Traceback" not in text and tagged_pids(tag) == []

    # another model: the servers refuse it naming the checkpoint; the job fails, nothing trains on it
    shutil.copytree(ckpt.directory(straight / "ckpt", 20), ckpt.directory(tmp_path / "other", 20))
    code, text = finish(
        start(tag, [*JOB, "--checkpoint-dir", str(tmp_path / "other"), "--resume", "latest", SCRIPT, "--wide", "2"]),
        timeout=180,
    )
    assert code != 0 and "another model" in text and str(tmp_path / "other") in text, text
    assert "STEP 1" not in text
    assert wait_for_no_tagged(tag, within=10) == []


def run_digits(tag: str, options: list[str], kill_at_epoch: int, tmp_path: Path) -> tuple[dict[str, Any], str]:
    out = tmp_path / "result.json"
    proc = start(
        tag,
        [
            "run",
            "--servers",
            "2",
            "--workers",
            "2",
            *options,
            "examples/digits.py",
            "--epochs",
            "20",
            "--out",
            str(out),
        ],
    )
    wait_for_line(proc, f"[worker 0] epoch {kill_at_epoch}/20", timeout=180)
    os.kill(role_pid(tag, "worker", 1), signal.SIGKILL)
    code, text = finish(proc, timeout=240)
    assert code == 0, text
    assert wait_for_no_tagged(tag, within=10) == []
    return json.loads(out.read_text()), text


def test_shrink_goes_on_without_a_killed_worker(tag: str, tmp_path: Path) -> None:
    result, text = run_digits(tag, ["--on-worker-failure", "shrink"], 5, tmp_path)
    assert "worker 1 was killed by SIGKILL: the job goes on without it (--on-worker-failure shrink)" in text, text
    assert "from step" in text and "the updates average workers [0]" in text, text
    assert result["test_accuracy"] >= 0.95, result


def test_restart_replaces_a_killed_worker_with_the_same_rank(tag: str, tmp_path: Path) -> None:
    result, text = run_digits(tag, ["--on-worker-failure", "restart", "--max-restarts", "1"], 5, tmp_path)
    assert "worker 1 was killed by SIGKILL: starting a replacement (1 of 1 restarts" in text, text
    assert "replaces the failed worker:1" in text, text
    assert result["test_accuracy"] >= 0.95 and result["steps"] > 400, result


def test_a_replacement_joins_a_resumed_job_after_its_checkpoint_was_pruned(straight: Path, tag: str,
                                                                           tmp_path: Path) -> None:
    """Resumed from checkpoint 20 with --keep 1: by step 50 checkpoint 20 is gone (40 replaced it). A worker
    killed then is replaced, and the replacement starts from the servers' values at the job's step instead of
    looking for its part of the long-gone checkpoint (zps chaos found this)."""
    shutil.copytree(ckpt.directory(straight / "ckpt", 20), ckpt.directory(tmp_path / "ckpt", 20))
    text = zps_job(tag, *JOB, "--checkpoint-dir", str(tmp_path / "ckpt"), "--keep", "1", "--resume", "latest",
                   "--kill", "worker:1@50", "--on-worker-failure", "restart", "--max-restarts", "1", SCRIPT,
                   "--steps", "60", "--out", str(tmp_path / "final.st"))
    assert "replaces the failed worker:1" in text, text
    assert not ckpt.directory(tmp_path / "ckpt", 20).exists()
    reference, final = load_file(str(straight / "final.safetensors")), load_file(str(tmp_path / "final.st"))
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], atol=1e-5, rtol=0)


def test_zps_run_refuses_a_resume_without_any_checkpoint(tag: str, tmp_path: Path) -> None:
    code, text = finish(start(tag, [*JOB, "--checkpoint-dir", str(tmp_path), "--resume", "latest", SCRIPT]), timeout=60)
    assert code == 2 and "holds no complete checkpoint" in text, text
    assert tagged_pids(tag) == []
