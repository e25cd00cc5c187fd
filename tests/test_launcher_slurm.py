"""`zps sbatch`'s batch script, run under a fake `sbatch` and `srun` on this host (tests/scripts/fake_slurm: a one-node
"cluster" whose steps are local processes), and `zps slurm` taking every job option."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zps.launcher.slurm import JOB_PORTS, SbatchOptions, job_port, render_sbatch, slurm_roles
from zps.protocol.config import ConfigError, JobConfig

from .helpers import ROOT, ZPS, wait_for_no_tagged

FAKE = ROOT / "tests" / "scripts" / "fake_slurm"


def batch_script(tmp_path: Path, *args: str) -> Path:
    """``zps sbatch ARGS`` into tmp_path/job.sh, running zps on the "nodes" as this interpreter does."""
    zps = tmp_path / "zps"
    zps.write_text(f"#!/bin/sh\nexec {sys.executable} -m zps.launcher.cli \"$@\"\n")
    zps.chmod(0o755)
    done = subprocess.run([*ZPS, "sbatch", "--zps", str(zps), "--keys-dir", str(tmp_path / "keys"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "job.sh"
    path.write_text(done.stdout)
    return path


def submit(path: Path, tag: str, timeout: float = 240) -> tuple[int, str]:
    env = {**os.environ, "PATH": f"{FAKE}:{os.environ['PATH']}", "ZPS_TEST_TAG": tag, "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("ZPS_", "SLURM_")) or k == "ZPS_TEST_TAG"}
    done = subprocess.run([str(FAKE / "sbatch"), str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.cluster
def test_the_batch_script_trains_digits_under_slurm(tmp_path: Path, tag: str) -> None:
    out = tmp_path / "result.json"
    path = batch_script(tmp_path, "--servers", "2", "--workers", "2", "--gpus-per-worker", "1", "--time", "0:30:00",
                        "--codec", "fp16", "examples/digits.py", "--epochs", "10", "--out", str(out))
    text = path.read_text()
    assert "#SBATCH hetjob" in text and text.count("--kill-on-bad-exit=1") == 2
    code, output = submit(path, tag)
    assert code == 0, output
    assert json.loads(out.read_text())["test_accuracy"] >= 0.9, output
    assert "(bsp)" in output and "for 2 servers and 2 workers" in output  # the coordinator's line
    assert wait_for_no_tagged(tag, within=10) == []
    assert list((tmp_path / "keys").iterdir()) == []  # the job's keys are gone with it
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700


@pytest.mark.cluster
def test_a_failed_worker_ends_the_batch_job_and_every_task(tmp_path: Path, tag: str) -> None:
    path = batch_script(tmp_path, "--servers", "1", "--workers", "2", "--kill", "worker:1@3",
                        "tests/scripts/train_steps.py", "--steps", "1000")
    code, output = submit(path, tag)
    assert code != 0, output
    assert wait_for_no_tagged(tag, within=20) == []
    assert list((tmp_path / "keys").iterdir()) == []


@pytest.mark.unit
def test_the_batch_script() -> None:
    job = JobConfig(num_servers=2, num_workers=4, secure=True, mode="ssp", staleness=2, codec="topk:ratio=0.01")
    text = render_sbatch(job, ["train.py", "--lr", "0.1 0.2"], SbatchOptions(
        time="4:00:00", server_partition="cpu", worker_partition="gpu", gpus_per_worker=1, worker_mem="64G",
        extra=("--qos=high",)))
    head, _, body = text.partition("\n\n")
    servers, _, workers = head.partition("#SBATCH hetjob")
    assert "#SBATCH --ntasks=2" in servers and "#SBATCH --partition=cpu" in servers and "gpu" not in servers
    assert "#SBATCH --time=4:00:00" in servers and "#SBATCH --qos=high" in servers
    assert "#SBATCH --ntasks=4" in workers and "#SBATCH --gpus-per-task=1" in workers
    assert "#SBATCH --partition=gpu" in workers and "#SBATCH --mem=64G" in workers
    assert "ZPS_MODE=ssp ZPS_STALENESS=2 ZPS_CODEC=topk:ratio=0.01" in body
    assert "slurm --role worker train.py --lr '0.1 0.2' &" in body  # quoted for the shell
    assert '"$ZPS" secrets "$KEYS" --servers 2 --workers 4' in body and "trap 'rm -rf \"$KEYS\"' EXIT" in body
    insecure = render_sbatch(JobConfig(num_workers=2), ["t.py"])
    assert "secrets" not in insecure and "ZPS_SECURE" not in insecure
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    for options, words in ((SbatchOptions(keys_dir="~/k k"), "--keys-dir"), (SbatchOptions(extra=("qos",)), "--sbatch"),
                           (SbatchOptions(gpus_per_worker=-1), "--gpus-per-worker")):
        with pytest.raises(ValueError, match=words):
            render_sbatch(job, ["t.py"], options)


@pytest.mark.unit
def test_a_port_per_job_and_a_role_per_step() -> None:
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "n[1-2]", "SLURMD_NODENAME": "n2"}
    assert job_port({}) == 29600
    ports = {job_port({"SLURM_JOB_ID": str(i)}) for i in (100, 101)}
    assert len(ports) == 2 and all(p in JOB_PORTS for p in ports)
    port = job_port({"SLURM_JOB_ID": "100"})
    assert slurm_roles({**env, "SLURM_JOB_ID": "100"}, 1)["ZPS_COORDINATOR"] == f"n1:{port}"
    roles = slurm_roles({**env, "ZPS_COORDINATOR": "n1:4000"}, 1, role="worker")
    assert roles == {"ZPS_ROLE": "worker", "ZPS_RANK": "1", "ZPS_COORDINATOR": "n1:4000", "ZPS_HOST": "n2"}
    with pytest.raises(ConfigError, match="--role 'coordinator'"):
        slurm_roles(env, 1, role="coordinator")


@pytest.mark.unit
def test_zps_slurm_takes_every_job_option() -> None:
    """The options reach the role (here: a bad codec spec is refused by name, as under zps run)."""
    env = {**os.environ, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "127.0.0.1"}
    done = subprocess.run([*ZPS, "slurm", "--codec", "nope", "--timeout", "5", "t.py"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--codec" in done.stderr and "unrecognized" not in done.stderr, done.stderr
