"""Embedding tables in checkpoints, with real processes: a job killed with SIGKILL and resumed ends with the bits of
the uninterrupted one (its rows, their optimizer state, the dense parameters), also when it resumes on another
number of servers (the rows re-spread by their ids)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zps.protocol import checkpoint as ckpt

from .helpers import ROOT, finish, kill_tagged, start, tagged_pids, wait_for_line, wait_for_no_tagged

pytestmark = pytest.mark.cluster

SCRIPT = str(ROOT / "tests" / "scripts" / "table_steps.py")
JOB = ["run", "--workers", "2", "--checkpoint-every", "10"]


def zps_job(tag: str, *args: str, timeout: float = 180) -> str:
    code, text = finish(start(tag, list(args)), timeout=timeout)
    assert code == 0, text
    assert wait_for_no_tagged(tag, within=10) == []
    return text


def table_rows(directory: Path) -> dict[str, torch.Tensor]:
    """The tables of a checkpoint, whatever number of servers wrote them: each tensor's rows in id order."""
    manifest = ckpt.read_manifest(directory)
    parts = [load_file(str(directory / entry["tables"]["file"])) for entry in manifest.body["servers"]]
    ids = torch.cat([p["emb.ids"] for p in parts])
    order = torch.argsort(ids)
    return {name: torch.cat([p[name] for p in parts])[order] for name in parts[0] if name != "emb.sketch"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("tables-straight")
    tag = f"tables-straight-{os.getpid()}"
    try:
        zps_job(tag, *JOB, "--servers", "2", "--checkpoint-dir", str(root / "ckpt"), SCRIPT, "--steps", "30", "--out",
                str(root / "final.st"))
    finally:
        kill_tagged(tag)
    assert [p.name for p in ckpt.complete(root / "ckpt")] == [f"ckpt-{s:09d}" for s in (10, 20, 30)]
    yield root


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def test_a_killed_job_resumes_its_tables_bit_for_bit(straight: Path, tag: str, tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    job = [*JOB, "--servers", "2", "--checkpoint-dir", str(root)]
    proc = start(tag, [*job, SCRIPT, "--steps", "30", "--pause-after", "15"])
    wait_for_line(proc, "PAUSED", timeout=120)
    deadline = time.monotonic() + 60
    while not (ckpt.directory(root, 10) / ckpt.MANIFEST).exists():
        assert time.monotonic() < deadline, "checkpoint 10 never completed"
        time.sleep(0.05)  # polling the file system for the coordinator's manifest, bounded
    for pid in tagged_pids(tag):  # kill -9 of every process, the launcher too
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert wait_for_no_tagged(tag, within=10) == []
    assert len(table_rows(ckpt.directory(root, 10))["emb.ids"]) > 100

    text = zps_job(tag, *job, "--resume", "latest", SCRIPT, "--steps", "30", "--out", str(tmp_path / "final.st"))
    assert "RESUMED at step 10: table at step 10" in text
    for step in (20, 30):  # every row, its optimizer state, when it was updated
        assert_same(table_rows(ckpt.directory(straight / "ckpt", step)), table_rows(ckpt.directory(root, step)))
    assert_same(load_file(str(straight / "final.st")), load_file(str(tmp_path / "final.st")))


def test_tables_resume_on_another_number_of_servers(straight: Path, tag: str, tmp_path: Path) -> None:
    """Checkpoint 10 of two servers, resumed on three: every row goes to the server its id names now, and the run
    ends with the two-server run's bits."""
    text = zps_job(tag, *JOB, "--servers", "3", "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume",
                   str(ckpt.directory(straight / "ckpt", 10)), SCRIPT, "--steps", "30", "--out",
                   str(tmp_path / "final.st"))
    assert "RESUMED at step 10" in text
    assert_same(table_rows(ckpt.directory(straight / "ckpt", 30)), table_rows(ckpt.directory(tmp_path / "ckpt", 30)))
    assert_same(load_file(str(straight / "final.st")), load_file(str(tmp_path / "final.st")))
