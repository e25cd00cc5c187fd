"""The local backend's zygote (`zps run --preload`, the default): one process imports torch once and forks every
server and worker. Real processes; the zygote's protocol spoken directly where the launcher would never misspeak."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from zps.launcher.backend import ProcSpec, role_command
from zps.launcher.procs import ProcessGroup
from zps.launcher.zygote import START_TIMEOUT
from zps.launcher.zygote_client import Zygote, ZygoteChild

from .helpers import FOREVER, ROOT, finish, role_pid, start, tagged_pids, wait_for_line, wait_for_no_tagged

pytestmark = pytest.mark.cluster


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:  # gone meanwhile
        return ""


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("PPid:")).split()[1])


def _zygotes(tag: str) -> list[int]:
    """(By name: a forked child's command line is the zygote's, /proc/PID/cmdline being what was exec'ed.)"""
    return [pid for pid in tagged_pids(tag) if _name(pid) == "zps-zygote"]


def test_a_job_through_the_zygote_trains_and_leaves_no_process(tag: str, tmp_path: Path) -> None:
    """(--no-preload: test_launcher_local's ASP run checks that nothing is forked then.)"""
    out = tmp_path / "result.json"
    args = ["run", "--servers", "2", "--workers", "2", "--log-level", "DEBUG", "--preload"]
    code, text = finish(start(tag, [*args, "examples/digits.py", "--epochs", "3", "--out", str(out)]), timeout=240)
    assert code == 0, text
    assert json.loads(out.read_text())["steps"] > 30
    forked = text.count("zps.launcher: zygote")  # "ready after", then one "forked pid" per process
    assert forked == 5, text
    assert "without it" not in text and "plain process" not in text, text
    assert wait_for_no_tagged(tag, within=10) == []


LIKE_FRESH = """
import json, os, random, signal, sys, threading
import numpy, torch
from zps import worker

client = worker.init()
print("STATE", json.dumps({
    "draws": [torch.rand(1).item(), numpy.random.rand(), random.random()],
    "threads": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"], "argv": sys.argv, "cwd": os.getcwd(),
    "sigint": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "sigpipe": signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN, "sigchld": signal.getsignal(signal.SIGCHLD) == 0,
    "leader": os.getsid(0) == os.getpid() == os.getpgid(0), "stdin": os.readlink("/proc/self/fd/0"),
}), flush=True)
threading.Thread(target=lambda: threading.Event().wait(0.2) or print("THREAD joined", flush=True)).start()
"""


def test_forked_workers_start_as_fresh_interpreters_would(tag: str, tmp_path: Path) -> None:
    """Each child draws its own random numbers, has the job's thread count, its argv and directory, a fresh
    interpreter's signal dispositions and its own session; non-daemon threads are joined before it exits."""
    (tmp_path / "fresh.py").write_text(LIKE_FRESH)
    code, text = finish(start(tag, ["run", "--workers", "2", "fresh.py", "x"], cwd=tmp_path), timeout=120)
    assert code == 0, text
    states = [json.loads(line.split(" STATE ", 1)[1]) for line in text.splitlines() if " STATE " in line]
    assert len(states) == 2, text
    for state in states:
        assert state["threads"] == int(state["omp"]), state  # what libgomp read in the zygote is the job's
        assert state["argv"] == ["fresh.py", "x"] and state["cwd"] == str(tmp_path), state
        assert state["sigint"] and state["sigpipe"] and state["sigchld"] and state["leader"], state
        assert state["stdin"] == "/dev/null", state
    first, second = (state["draws"] for state in states)
    assert all(a != b for a, b in zip(first, second, strict=True)), states
    assert text.count("THREAD joined") == 2, text
    assert wait_for_no_tagged(tag, within=10) == []


def test_a_forked_child_killed_by_sigkill_is_reported_so(tag: str) -> None:
    proc = start(tag, ["run", "--servers", "1", "--workers", "2", FOREVER])
    wait_for_line(proc, "TRAINING", timeout=90)
    victim = role_pid(tag, "worker", 1)  # found by its name, zps-worker-1
    assert _zygotes(tag) == [_parent(victim)]  # forked, not exec'ed
    os.kill(victim, signal.SIGKILL)
    code, text = finish(proc, timeout=60)
    assert code == 128 + signal.SIGKILL, text
    assert "worker 1 was killed by SIGKILL" in text, text
    assert wait_for_no_tagged(tag, within=10) == []


def test_the_zygote_and_its_children_die_with_the_launcher(tag: str) -> None:
    proc = start(tag, ["run", "--servers", "1", "--workers", "2", FOREVER])
    wait_for_line(proc, "TRAINING", timeout=90)
    assert len(_zygotes(tag)) == 1 and len(tagged_pids(tag)) == 5  # launcher, zygote, server, 2 workers
    proc.kill()  # SIGKILL: no teardown; the kernel ends the zygote, which takes its children along
    proc.wait(timeout=10)
    assert wait_for_no_tagged(tag, within=10) == []


class _Raw:
    """The launcher's end of a zygote's socket, spoken by hand."""

    def __init__(self, tag: str) -> None:
        self.env = {**os.environ, "ZPS_TEST_TAG": tag, "PYTHONUNBUFFERED": "1"}
        self.env = {k: v for k, v in self.env.items() if not k.startswith("ZPS_") or k == "ZPS_TEST_TAG"}
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "zps.launcher.zygote", str(theirs.fileno())],
                                     env=self.env, cwd=ROOT, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock.settimeout(START_TIMEOUT)
        assert self.receive() == {"ready": self.proc.pid}
        self.sock.settimeout(30)

    def receive(self) -> dict:
        return json.loads(self.sock.recv(65536))

    def send(self, data: bytes, fds: list[int] | None = None) -> dict:
        socket.send_fds(self.sock, [data], fds or [])
        return self.receive()


def test_a_malformed_request_gets_an_error_and_the_zygote_goes_on(tag: str) -> None:
    raw = _Raw(tag)
    try:
        read_end, write_end = os.pipe()
        good = {"id": 7, "role": "server", "script": [], "env": raw.env, "cwd": str(ROOT)}
        for request, fds, words in [
            (b"not json", [], "not JSON"),
            (b"", [], "not JSON"),
            (b"[1, 2]", [], "not a JSON object"),
            (b"[" * 100_000, [], "not JSON"),
            (json.dumps({**good, "id": "seven"}).encode(), [write_end], "no integer id"),
            (json.dumps({**good, "script": "train.py"}).encode(), [write_end], "script must be a list"),
            (json.dumps({**good, "role": "coordinator"}).encode(), [write_end], "role must be one of"),
            (json.dumps({**good, "env": {"A=B": "c"}}).encode(), [write_end], "env must map names"),
            (json.dumps({**good, "cwd": "/no/such/dir"}).encode(), [write_end], "is not a directory"),
            (json.dumps(good).encode(), [], "one descriptor"),
            (json.dumps(good).encode(), [write_end, write_end], "one descriptor"),
            (json.dumps({**good, "env": {**raw.env, "OMP_NUM_THREADS": "7"}}).encode(), [write_end],
             "OMP_NUM_THREADS differ"),
        ]:
            reply = raw.send(request, fds)
            assert set(reply) == {"id", "error"} and words in reply["error"], (request[:80], reply)
            assert reply["id"] == (7 if request.startswith(b"{") and b'"seven"' not in request else None)
        # and it still forks: `zps node` without a role says so and exits 2
        reply = raw.send(json.dumps(good).encode(), [write_end])
        os.close(write_end)
        assert reply["id"] == 7 and isinstance(reply["pid"], int), reply
        with os.fdopen(read_end, "rb") as output:
            text = output.read().decode()  # EOF: the child and every copy of the write end are gone
        assert "ZPS_ROLE" in text and "is not set" in text, text
        assert raw.receive() == {"exited": reply["pid"], "code": 2}
    finally:
        raw.sock.close()  # the launcher's end closed: the zygote exits
        code = raw.proc.wait(timeout=30)
    assert code == 0


def _server(rank: int, env: dict[str, str], zygote: Zygote) -> ProcSpec:
    """A server to start (without its ZPS_* variables: `zps node` says ZPS_ROLE is not set and exits 2)."""
    return ProcSpec(f"server {rank}", "server", rank, role_command(sys.executable, []), env, zygote=zygote)


def test_a_zygote_that_cannot_start_means_plain_processes_said_once(tag: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZPS_")}
    env = {**env, "ZPS_TEST_TAG": tag}
    zygote = Zygote(env, command=[sys.executable, "-c", "raise SystemExit(3)"])
    out = io.StringIO()
    group = ProcessGroup(out)
    try:
        children = [group.start(_server(rank, env, zygote)) for rank in range(2)]
        assert [child.proc.wait(timeout=60) for child in children] == [2, 2]  # `zps node` without a role
    finally:
        group.terminate()
    text = out.getvalue()
    assert text.count("the zygote (--preload) failed: it exited (code 3); starting processes without it") == 1, text
    assert text.count("ZPS_ROLE") == 2, text
    assert wait_for_no_tagged(tag, within=10) == []


def test_a_request_the_zygote_refuses_starts_as_a_plain_process(tag: str) -> None:
    """Per child: an environment too large for one message (or differing in what a process reads at start-up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZPS_")}
    env = {**env, "ZPS_TEST_TAG": tag, "PYTHONUNBUFFERED": "1"}
    huge = {**env, **{f"ZPS_TEST_BULK_{i}": "x" * 60_000 for i in range(4)}}  # 240 kB: more than a socket holds
    out = io.StringIO()
    group = ProcessGroup(out)
    zygote = Zygote(env)
    try:
        forked = group.start(_server(0, env, zygote))
        plain = group.start(_server(1, huge, zygote))
        assert isinstance(forked.proc, ZygoteChild) and isinstance(plain.proc, subprocess.Popen)
        assert [forked.proc.wait(timeout=60), plain.proc.wait(timeout=60)] == [2, 2]  # `zps node` without a role
    finally:
        group.terminate()
    text = out.getvalue()
    assert "server 1: the zygote cannot fork it (the request is too large" in text, text
    assert "starting it as a plain process" in text and "server 0: the zygote" not in text, text
    assert text.count("ZPS_ROLE") == 2, text
    assert wait_for_no_tagged(tag, within=10) == []
