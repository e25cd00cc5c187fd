"""`zps node`, `zps slurm`, `zps k8s` and `zps launch --dry-run`: roles from the environment, one process each.

The multi-process tests start a coordinator, servers and workers as separate processes on loopback, the way a
scheduler would, with the variables each scheduler sets (ZPS_*, DMLC_*, torchrun's, Slurm's); every process
carries ZPS_TEST_TAG so the fixture ends whatever is left, even when a test fails.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zps.launcher.node import node_env

from .helpers import ROOT, ZPS, Procs, free_port, wait_for_no_tagged

pytestmark = pytest.mark.cluster

# a few training steps; each worker writes what it learned about itself to OUT_DIR/worker-<rank>.json
STEPS = """
import json, os, sys, torch
from zps import worker
client = worker.init()
model = torch.nn.Linear(4, 2)
opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
for _ in range(5):
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
t = client.topology
facts = {"rank": client.rank, "workers": client.num_workers, "servers": t.num_servers, "mode": t.mode,
         "staleness": t.staleness, "local_rank": os.environ.get("ZPS_LOCAL_RANK"), "argv": sys.argv[1:]}
with open(os.path.join(sys.argv[1], f"worker-{client.rank}.json"), "w") as f:
    json.dump(facts, f)
worker.shutdown()
"""


@pytest.fixture()
def procs(tag: str, tmp_path: Path) -> Procs:
    return Procs(tag, tmp_path)


@pytest.fixture()
def script(tmp_path: Path) -> list[str]:
    path = tmp_path / "steps.py"
    path.write_text(STEPS)
    return [str(path), str(tmp_path)]


def check_job(procs: Procs, tag: str, script: list[str], workers: int, timeout: float = 90) -> list[dict]:
    """Every process exited 0 and is gone; what each worker wrote, by rank."""
    codes = procs.wait(timeout)
    assert set(codes.values()) == {0}, f"{codes}\n{procs.logs()}"
    assert wait_for_no_tagged(tag, within=5) == []
    return [json.loads((Path(script[1]) / f"worker-{rank}.json").read_text()) for rank in range(workers)]


def test_zps_node_with_zps_variables(procs: Procs, tag: str, script: list[str]) -> None:
    port = free_port()
    common = {
        "ZPS_COORDINATOR": f"127.0.0.1:{port}",
        "ZPS_NUM_SERVERS": "2",
        "ZPS_NUM_WORKERS": "2",
        "ZPS_TIMEOUT": "60",
    }
    # the coordinator alone reads the consistency mode
    procs.start("coordinator", {**common, "ZPS_ROLE": "coordinator", "ZPS_MODE": "ssp", "ZPS_STALENESS": "1"}, ["node"])
    for rank in range(2):
        procs.start(f"server{rank}", {**common, "ZPS_ROLE": "server", "ZPS_RANK": str(rank)}, ["node"])
        procs.start(f"worker{rank}", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": str(rank)}, ["node", *script])
    facts = check_job(procs, tag, script, workers=2)
    assert [(f["rank"], f["mode"], f["staleness"], f["workers"], f["servers"]) for f in facts] == [
        (0, "ssp", 1, 2, 2),
        (1, "ssp", 1, 2, 2),
    ]
    assert facts[0]["argv"] == script[1:]  # the script saw its own arguments, as under python SCRIPT ARGS
    assert f"coordinator at 127.0.0.1:{port} for 2 servers and 2 workers (ssp)" in procs.log("coordinator")


def test_zps_node_with_dmlc_variables(procs: Procs, tag: str, script: list[str]) -> None:
    common = {
        "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": str(free_port()),
        "DMLC_NUM_SERVER": "1",
        "DMLC_NUM_WORKER": "2",
        "ZPS_TIMEOUT": "60",
    }
    procs.start("scheduler", {**common, "DMLC_ROLE": "scheduler"}, ["node"])
    procs.start("server", {**common, "DMLC_ROLE": "server"}, ["node"])
    for rank in (1, 0):
        procs.start(f"worker{rank}", {**common, "DMLC_ROLE": "worker", "DMLC_WORKER_ID": str(rank)}, ["node", *script])
    facts = check_job(procs, tag, script, workers=2)
    assert [(f["rank"], f["mode"], f["workers"], f["servers"]) for f in facts] == [(0, "bsp", 2, 1), (1, "bsp", 2, 1)]


def test_zps_node_joins_torchrun_workers(procs: Procs, tag: str, script: list[str]) -> None:
    master_port = free_port()
    # torchrun starts the workers only; the coordinator (at MASTER_PORT + 1) and the servers come separately
    zps = {
        "ZPS_COORDINATOR": f"127.0.0.1:{master_port + 1}",
        "ZPS_NUM_SERVERS": "1",
        "ZPS_NUM_WORKERS": "2",
        "ZPS_TIMEOUT": "60",
    }
    procs.start("coordinator", {**zps, "ZPS_ROLE": "coordinator"}, ["node"])
    procs.start("server", {**zps, "ZPS_ROLE": "server"}, ["node"])
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
        "-m",
        "zps.launcher.cli",
    ]
    procs.start("torchrun", {"ZPS_TIMEOUT": "60"}, ["node", "--servers", "1", *script], command=torchrun)
    facts = check_job(procs, tag, script, workers=2)
    assert [(f["rank"], f["local_rank"], f["workers"], f["servers"]) for f in facts] == [(0, "0", 2, 1), (1, "1", 2, 1)]


def test_zps_slurm_tasks(procs: Procs, tag: str, script: list[str]) -> None:
    port = free_port()
    slurm = {"SLURM_NTASKS": "3", "SLURM_JOB_NODELIST": "127.0.0.1", "ZPS_TIMEOUT": "60"}
    for task in range(3):  # task 0: server 0 and the coordinator; tasks 1, 2: workers 0, 1
        procs.start(
            f"task{task}",
            {**slurm, "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)},
            ["slurm", "--servers", "1", "--port", str(port), *script],
        )
    facts = check_job(procs, tag, script, workers=2)
    assert [(f["rank"], f["local_rank"], f["workers"], f["servers"]) for f in facts] == [(0, "1", 2, 1), (1, "2", 2, 1)]


def test_a_missing_worker_fails_the_job_naming_its_rank(procs: Procs, tag: str, script: list[str]) -> None:
    common = {
        "ZPS_COORDINATOR": f"127.0.0.1:{free_port()}",
        "ZPS_NUM_SERVERS": "1",
        "ZPS_NUM_WORKERS": "3",
        "ZPS_TIMEOUT": "25",  # long enough for every process to start on a loaded 2-core machine (two tests at once)
    }
    started = time.monotonic()
    procs.start("coordinator", {**common, "ZPS_ROLE": "coordinator"}, ["node"])
    procs.start("server", {**common, "ZPS_ROLE": "server"}, ["node"])
    for rank in range(2):  # the job expects 3
        procs.start(f"worker{rank}", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": str(rank)}, ["node", *script])
    codes = procs.wait(timeout=90)
    assert time.monotonic() - started < 60, procs.logs()
    assert all(code != 0 for code in codes.values()), f"{codes}\n{procs.logs()}"
    # "waiting for 1 of 3 workers (ranks 2)"; on a slow machine others may not have made it in time either
    missing = re.compile(r"the cluster is incomplete after 25s: waiting for .*\d of 3 workers \(ranks [\d, ]*\b2\)")
    assert missing.search(procs.log("coordinator")), procs.logs()
    assert missing.search(procs.log("server")), procs.logs()  # every waiting process says the same
    assert wait_for_no_tagged(tag, within=5) == []


def test_zps_node_without_a_role_says_what_to_set(procs: Procs) -> None:
    procs.start("nothing", {}, ["node", "examples/digits.py"])
    assert procs.wait(timeout=30) == {"nothing": 2}
    assert "ZPS_ROLE (or DMLC_ROLE) is not set" in procs.log("nothing")


def test_node_env_precedence() -> None:
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
    env = node_env(torchrun, num_servers=2)
    assert (env["ZPS_ROLE"], env["ZPS_RANK"], env["ZPS_NUM_WORKERS"], env["ZPS_NUM_SERVERS"]) == (
        "worker",
        "3",
        "4",
        "2",
    )
    assert (env["ZPS_COORDINATOR"], env["ZPS_LOCAL_RANK"]) == ("n0:29501", "1")
    # an explicit role wins over torchrun's variables; a Kubernetes ordinal gives the rank
    env = node_env({**torchrun, "ZPS_ROLE": "server", "ZPS_RANK_FROM": "hostname-ordinal", "HOSTNAME": "zps-server-5"})
    assert (env["ZPS_ROLE"], env["ZPS_RANK"]) == ("server", "5")
    env = node_env({"DMLC_ROLE": "scheduler", "DMLC_PS_ROOT_URI": "10.0.0.1", "DMLC_PS_ROOT_PORT": "9000"})
    assert (env["ZPS_ROLE"], env["ZPS_COORDINATOR"]) == ("coordinator", "10.0.0.1:9000")


# --- commands that only print ----------------------------------------------------------------------------------


def run_zps(*args: str) -> tuple[int, str, str]:
    done = subprocess.run(ZPS + list(args), cwd=ROOT, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr




def test_zps_launch_dry_run_shows_placement_and_commands(tmp_path: Path) -> None:
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.2 slots=2\n127.0.0.3 slots=1\n")
    code, out, err = run_zps(
        "launch",
        "--hostfile",
        str(hostfile),
        "--servers",
        "2",
        "--workers",
        "3",
        "--port",
        "29999",
        "--ssh-port",
        "2222",
        "--user",
        "alice",
        "--env",
        "A=b c",
        "--python",
        "/opt/venv/bin/python",
        "--workdir",
        "/srv/job",
        "--dry-run",
        "examples/digits.py",
        "--epochs",
        "1",
    )
    assert code == 0, err
    lines = out.splitlines()
    table = [line.split() for line in lines if line.startswith(("server ", "worker "))]
    assert table == [
        ["server", "0", "127.0.0.2", "0"],
        ["server", "1", "127.0.0.3", "0"],
        ["worker", "0", "127.0.0.2", "0"],
        ["worker", "1", "127.0.0.2", "1"],
        ["worker", "2", "127.0.0.3", "0"],
    ]
    assert any(line.startswith("coordinator") and "127.0.0.1 (in zps launch)" in line for line in lines), out
    commands = {
        line.split("] ", 1)[0][1:]: shlex.split(line.split("] ", 1)[1]) for line in lines if line.startswith("[")
    }
    assert list(commands) == [
        "server 0@127.0.0.2",
        "server 1@127.0.0.3",
        "worker 0@127.0.0.2",
        "worker 1@127.0.0.2",
        "worker 2@127.0.0.3",
    ]
    ssh = commands["worker 1@127.0.0.2"]
    assert ssh[:2] == ["ssh", "-T"] and "BatchMode=yes" in ssh
    assert ssh[ssh.index("-p") + 1] == "2222" and ssh[ssh.index("-l") + 1] == "alice"
    assert ssh[-3:-1] == ["127.0.0.2", "--"]
    remote = shlex.split(ssh[-1])  # what the remote shell sees
    assert remote[:4] == ["cd", "/srv/job", "&&", "exec"]
    assert {
        "A=b c",
        "ZPS_ROLE=worker",
        "ZPS_RANK=1",
        "ZPS_LOCAL_RANK=1",
        "ZPS_COORDINATOR=127.0.0.1:29999",
        "ZPS_NUM_WORKERS=3",
    } <= set(remote)
    assert remote[-9:] == [
        "--",
        "/opt/venv/bin/python",
        "-u",
        "-m",
        "zps.launcher.cli",
        "node",
        "examples/digits.py",
        "--epochs",
        "1",
    ]
    server = shlex.split(commands["server 1@127.0.0.3"][-1])
    assert "ZPS_ROLE=server" in server and server[-6:] == [
        "--",
        "/opt/venv/bin/python",
        "-u",
        "-m",
        "zps.launcher.cli",
        "node",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hosts", "127.0.0.2", "--workers", "2"], "2 workers need 2 slots"),
        (["--hosts", "127.0.0.2:2", "--env", "ZPS_HOST=1.2.3.4"], "--interface chooses the bind address"),
        (["--hosts", "127.0.0.2:2", "--env", "ZPS_TIMEOUT=5"], "ZPS_TIMEOUT: zps launch sets it"),
        (["--hosts", "127.0.0.2:2", "--env", "no-name"], "write NAME=VALUE"),
    ],
)
def test_zps_launch_refuses_what_cannot_work(args: list[str], message: str) -> None:
    code, out, err = run_zps("launch", *args, "--dry-run", "examples/digits.py")
    assert code == 2 and message in err, err
