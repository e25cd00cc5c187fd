"""`zps launch` over real ssh: a throw-away sshd on loopback, where 127.0.0.2 and 127.0.0.3 are two hosts.

Training reaches the local backend's accuracy; a remote worker killed mid-run ends the job naming it; a
launcher killed outright takes every remote process along; the preflight catches an unreachable host, a busy
port, a wrong interface and a version mismatch within seconds, and starts nothing. Every process of a job
carries ZPS_TEST_TAG (in the launcher's environment and, through --env, the remote ones), so the process table
shows what is left on any "host".
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import zps
from zps.launcher.preflight import Problem, compare, format_problems

from .helpers import ROOT, ZPS, finish, role_pid, tagged_pids, wait_for_line, wait_for_no_tagged
from .sshd import Sshd, descendants, openssh_missing

pytestmark = pytest.mark.cluster

FOREVER = "tests/scripts/train_forever.py"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    reason = openssh_missing()
    if reason:
        pytest.skip(reason)
    with Sshd(tmp_path_factory.mktemp("sshd")) as daemon:  # stopped at teardown, also when a test failed
        yield daemon


def launch(sshd: Sshd, tag: str, *args: str) -> subprocess.Popen:
    options = [a for o in sshd.client_options() for a in ("--ssh-option", o)]
    argv = [*ZPS, "launch", "--ssh-port", str(sshd.port), *options, "--env", f"ZPS_TEST_TAG={tag}", *args]
    return subprocess.Popen(
        argv, cwd=ROOT, env={**os.environ, "ZPS_TEST_TAG": tag}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def assert_nothing_left(sshd: Sshd, tag: str, within: float = 15) -> None:
    assert wait_for_no_tagged(tag, within=within) == []
    deadline = time.monotonic() + within
    assert sshd.proc is not None
    while descendants(sshd.proc.pid) and time.monotonic() < deadline:  # sshd's sessions end with their clients
        time.sleep(0.05)  # polling the process table, bounded by the deadline
    assert descendants(sshd.proc.pid) == []


def write_hostfile(path: Path) -> str:
    path.write_text("# two hosts on loopback\n127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    return str(path)


def test_digits_over_ssh_on_two_hosts(sshd: Sshd, tag: str, tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    proc = launch(
        sshd,
        tag,
        "--hostfile",
        write_hostfile(tmp_path / "hosts"),
        "--servers",
        "2",
        "--workers",
        "2",
        "examples/digits.py",
        "--epochs",
        "20",
        "--out",
        str(result),
    )
    code, text = finish(proc, timeout=120)
    assert code == 0, text
    summary = json.loads(result.read_text())
    assert summary["test_accuracy"] >= 0.95, summary
    assert (summary["workers"], summary["servers"]) == (2, 2)
    # one server per host, each bound to its own host's address (not 0.0.0.0, not the launcher's)
    assert "[server 0@127.0.0.2] " in text and "serving at tcp://127.0.0.2:" in text, text
    assert "[server 1@127.0.0.3] " in text and "serving at tcp://127.0.0.3:" in text, text
    assert "[worker 0@127.0.0.2] epoch 20/20" in text, text
    assert_nothing_left(sshd, tag)


def test_a_killed_remote_worker_ends_the_job_and_leaves_nothing(sshd: Sshd, tag: str, tmp_path: Path) -> None:
    proc = launch(
        sshd, tag, "--hostfile", write_hostfile(tmp_path / "hosts"), "--servers", "2", "--workers", "2", FOREVER
    )
    wait_for_line(proc, "[worker 1@127.0.0.3] TRAINING", timeout=60)  # its progress: training steps are done
    # --secure is zps launch's default: the keys reached every role, and no command line shows them
    for pid in tagged_pids(tag):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
        assert b'"secret"' not in command and b"ZPS_SECRETS" not in command, command
    os.kill(role_pid(tag, "worker", 1), signal.SIGKILL)
    killed_at = time.monotonic()
    code, text = finish(proc, timeout=60)
    assert code == 128 + signal.SIGKILL, text
    assert time.monotonic() - killed_at < 20, text
    assert "worker 1@127.0.0.3 exited with code 137: stopping the job" in text, text
    assert "zps: worker 1@127.0.0.3 (pid" in text and "was killed by SIGKILL" in text, text
    assert_nothing_left(sshd, tag)


def test_a_launcher_killed_outright_takes_the_remote_processes_along(sshd: Sshd, tag: str) -> None:
    proc = launch(sshd, tag, "--hosts", "127.0.0.2,127.0.0.3", "--servers", "1", "--workers", "2", FOREVER)
    wait_for_line(proc, "TRAINING", timeout=60)
    assert role_pid(tag, "server", 0) and role_pid(tag, "worker", 1)
    proc.kill()  # no teardown: the ssh clients die with it (pdeathsig), then the remote guards end their roles
    proc.wait(timeout=10)
    assert_nothing_left(sshd, tag)


# --- preflight -------------------------------------------------------------------------------------------------


def preflight(sshd: Sshd, tag: str, *args: str, script: str = "examples/digits.py") -> tuple[int, str]:
    started = time.monotonic()
    code, text = finish(launch(sshd, tag, "--servers", "2", "--workers", "2", *args, script), timeout=60)
    assert time.monotonic() - started < 20, text
    assert code == 2, text
    assert "nothing was started" in text, text
    assert tagged_pids(tag) == []
    return code, text


def test_preflight_names_an_unreachable_host(sshd: Sshd, tag: str) -> None:
    _, text = preflight(sshd, tag, "--hosts", "127.0.0.2,127.0.0.9")
    row = next(line for line in text.splitlines() if line.startswith("127.0.0.9"))
    assert " ssh " in row and "Connection refused" in row, text
    assert not any(line.startswith("127.0.0.2 ") for line in text.splitlines()), text


def test_preflight_names_a_busy_coordinator_port(sshd: Sshd, tag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _, text = preflight(sshd, tag, "--hosts", "127.0.0.2,127.0.0.3", "--port", str(port))
    assert f"the coordinator port 127.0.0.1:{port} is already in use" in text, text


def test_preflight_names_a_wrong_interface_on_every_host(sshd: Sshd, tag: str) -> None:
    _, text = preflight(sshd, tag, "--hosts", "127.0.0.2,127.0.0.3", "--interface", "nosuch0")
    rows = [line for line in text.splitlines() if "no network interface 'nosuch0'" in line]
    assert sorted(row.split()[0] for row in rows) == ["127.0.0.2", "127.0.0.3", "launcher"], text


def test_preflight_names_a_zps_version_mismatch_and_a_missing_script(sshd: Sshd, tag: str, tmp_path: Path) -> None:
    # a zps 9.9 distribution first on the remote processes' path: what the remote Python really reports
    dist = tmp_path / "site" / "zps-9.9.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zps\nVersion: 9.9\n")
    _, text = preflight(
        sshd, tag, "--hosts", "127.0.0.2:2", "--env", f"PYTHONPATH={dist.parent}", script="examples/nosuch.py"
    )
    assert f"zps 9.9 there, {zps.__version__} on the launcher host" in text, text
    assert "examples/nosuch.py is not a file in" in text, text


def test_preflight_compares_python_versions() -> None:
    local = {"python": "3.11.7", "zps": "0.1.0"}
    same = {"python": "3.11.2", "zps": "0.1.0", "importable": True, "problems": []}
    assert compare("h", "/py", local, same) == []
    assert compare("h", "/py", local, {**same, "zps": None}) == []  # a source checkout in the workdir
    problems = compare(
        "h", "/py", local, {"python": "3.12.1", "zps": None, "importable": False, "problems": [["reach", "x"]]}
    )
    assert [(p.check, p.host) for p in problems] == [("reach", "h"), ("python", "h"), ("zps", "h")]
    assert "Python 3.12.1 there, the launcher runs 3.11.7" in problems[1].detail
    assert "/py cannot import zps there; install it there (pip install zps==0.1.0" in problems[2].detail
    table = format_problems(problems + [Problem("launcher", "port", "busy")])
    assert table.splitlines()[1].split() == ["host", "check", "problem"]
