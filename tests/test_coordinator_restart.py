"""A coordinator that can die: the data path goes on without it; restarted on the same address it rebuilds the
job's membership from the members' re-registration (``rejoin``) and the job completes; never restarted, every
process ends within the heartbeat timeout naming it.

The first test drives a coordinator with raw messages, the others are `zps node` jobs of real processes (one
server, two workers) whose coordinator is killed with SIGKILL mid-run.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from zps.launcher.coordinator import Coordinator
from zps.protocol.config import JobConfig
from zps.protocol.messages import PROTOCOL_VERSION, Kind, Message, parse_frames

from .helpers import ROOT, Procs, finish, free_port, wait_for_line, wait_for_no_tagged

pytestmark = pytest.mark.cluster

TRAIN = str(ROOT / "tests" / "scripts" / "train_steps.py")


def dealer(address: str) -> zmq.Socket:
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def send(sock: zmq.Socket, kind: str, src: str, request_id: int, **body: Any) -> None:
    head = {"v": PROTOCOL_VERSION, "kind": kind, "id": request_id, "src": src, "body": body}
    sock.send_multipart([msgpack.packb(head)])


def reply(sock: zmq.Socket) -> Message:
    assert sock.poll(10_000), "no reply from the coordinator within 10s"
    return parse_frames(sock.recv_multipart())


def rejoin(sock: zmq.Socket, role: str, rank: int, request_id: int, pid: int = 1000, **more: Any) -> Message:
    send(sock, "register", f"{role}:{rank}", request_id, role=role, rank=rank, host="h", pid=pid + rank,
         rejoin=True, **more)
    return reply(sock)


def test_a_restarted_coordinator_rebuilds_the_membership_from_rejoins() -> None:
    """Fresh state, as after a restart: each member is told it is unknown, rejoins, and the job goes on; meanwhile
    nothing new joins and a barrier waits until every member is back."""
    job = JobConfig(num_servers=1, num_workers=2, timeout=30, heartbeat_timeout=10, heartbeat_interval=0.2)
    coordinator = Coordinator(job)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(coordinator.serve()), daemon=True)
    thread.start()
    s0, w0, w1, new = socks = [dealer(coordinator.address) for _ in range(4)]
    try:
        send(s0, "heartbeat", "server:0", 7)
        told = reply(s0)
        assert (told.kind, told.id, told.body["code"]) == (Kind.ERROR, 7, "unknown_member"), told.body
        send(s0, "register", "server:0", 8, role="server", rank=0, host="h", pid=1, rejoin="yes")
        assert reply(s0).body["code"] == "bad_header"
        assert rejoin(s0, "server", 0, 9, address="tcp://127.0.0.1:5999").kind is Kind.OK
        # recovering: a newcomer is told why it cannot join
        send(new, "register", "worker:?", 1, role="worker", rank=-1, host="h", pid=5)
        refused = reply(new)
        assert refused.body["code"] == "recovering" and "nothing new can join" in refused.body["reason"], refused.body
        assert rejoin(w0, "worker", 0, 1).kind is Kind.OK
        send(w0, "barrier", "worker:0", 2, name="b")
        send(w0, "status", "worker:0", 3)  # answered after the barrier was handled: the barrier still waits
        status = reply(w0)
        assert (status.id, status.body["state"]) == (3, "recovering"), status
        assert rejoin(w1, "worker", 1, 1).kind is Kind.OK
        assert rejoin(w1, "worker", 1, 2).kind is Kind.OK  # again (another thread of it): nothing changes
        assert rejoin(new, "worker", 1, 3, pid=2000).body["code"] == "conflict"  # another process than worker 1
        send(w0, "status", "worker:0", 4)
        status = reply(w0)
        assert (status.id, status.body["state"]) == (4, "running"), status  # the barrier waits for worker 1 still
        send(w1, "barrier", "worker:1", 2, name="b")
        assert [(m.kind, m.id) for m in (reply(w0), reply(w1))] == [(Kind.OK, 2), (Kind.OK, 2)]
        send(new, "register", "worker:?", 2, role="worker", rank=-1, host="h", pid=5)
        assert reply(new).body["code"] == "conflict"  # the cluster is complete again
        for sock, rank in ((w0, 0), (w1, 1)):
            send(sock, "done", f"worker:{rank}", 9, exit_code=0)
            assert reply(sock).kind is Kind.OK
        send(s0, "heartbeat", "server:0", 10)
        assert reply(s0).kind is Kind.SHUTDOWN  # every worker finished: the job is over
        send(s0, "done", "server:0", 11, exit_code=0)
        assert reply(s0).kind is Kind.OK
        thread.join(timeout=10)
        assert codes == [0]
    finally:
        coordinator.stop()
        thread.join(timeout=10)
        for sock in socks:
            sock.close()


def node_job(procs: Procs, steps: int, heartbeat_timeout: float, step_time: float) -> tuple[dict[str, str], Any]:
    """A `zps node` job of a coordinator, one server and two workers training ``steps`` steps; worker 0's output
    is piped (the test reads it)."""
    common = {
        "ZPS_COORDINATOR": f"127.0.0.1:{free_port()}",
        "ZPS_NUM_SERVERS": "1",
        "ZPS_NUM_WORKERS": "2",
        "ZPS_TIMEOUT": "60",
        "ZPS_HEARTBEAT_INTERVAL": "0.1",
        "ZPS_HEARTBEAT_TIMEOUT": str(heartbeat_timeout),
    }
    train = ["node", TRAIN, "--steps", str(steps), "--step-time", str(step_time)]
    procs.start("coordinator", {**common, "ZPS_ROLE": "coordinator"}, ["node"])
    procs.start("server", {**common, "ZPS_ROLE": "server", "ZPS_RANK": "0"}, ["node"])
    worker0 = procs.start("worker0", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": "0"}, train, pipe=True)
    procs.start("worker1", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": "1"}, train)
    return common, worker0


def steps_of(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^STEP (\d+)$", text, re.MULTILINE)]


def test_training_goes_on_through_a_coordinator_killed_and_restarted(tag: str, tmp_path: Path) -> None:
    procs = Procs(tag, tmp_path)
    steps = 200
    common, worker0 = node_job(procs, steps, heartbeat_timeout=10, step_time=0.02)
    try:
        seen = wait_for_line(worker0, "STEP 10", timeout=120)  # (starting four Pythons with torch on 2 cores)
        procs.procs["coordinator"].kill()  # SIGKILL
        killed = time.monotonic()
        assert procs.procs["coordinator"].wait(timeout=10) == -signal.SIGKILL
        seen += wait_for_line(worker0, "STEP 30", timeout=30)  # the data path does not wait for the coordinator
        procs.start("coordinator2", {**common, "ZPS_ROLE": "coordinator"}, ["node"])
        seen += wait_for_line(worker0, "rejoined it", timeout=30)
        rejoined = time.monotonic()
        codes = procs.wait(timeout=60)
        _, rest = finish(worker0, timeout=10)
        seen += rest
        print(f"worker 0 rejoined {rejoined - killed:.1f}s after the coordinator was killed; the job ended "
              f"{time.monotonic() - rejoined:.1f}s later")
        assert codes == {"coordinator": -signal.SIGKILL, "server": 0, "worker0": 0, "worker1": 0, "coordinator2": 0}, (
            f"{codes}\n{seen}\n{procs.logs()}")
        assert steps_of(seen) == list(range(1, steps + 1)), seen
        assert steps_of(procs.log("worker1")) == list(range(1, steps + 1)), procs.log("worker1")
        after = seen[seen.index("rejoined it"):]
        assert steps_of(after), f"no step after worker 0 rejoined: training did not go on\n{seen}"
        assert "every member of the job rejoined" in procs.log("coordinator2"), procs.log("coordinator2")
        assert "rejoined it" in procs.log("server"), procs.log("server")
        assert wait_for_no_tagged(tag, within=10) == []
    finally:
        if worker0.stdout is not None:
            worker0.stdout.close()


def test_a_coordinator_killed_for_good_ends_every_process_naming_it(tag: str, tmp_path: Path) -> None:
    procs = Procs(tag, tmp_path)
    heartbeat_timeout = 2.0
    common, worker0 = node_job(procs, 100_000, heartbeat_timeout=heartbeat_timeout, step_time=0.01)
    try:
        wait_for_line(worker0, "STEP 10", timeout=120)
        os.kill(procs.procs["coordinator"].pid, signal.SIGKILL)
        killed = time.monotonic()
        codes = procs.wait(timeout=heartbeat_timeout + 30)
        took = time.monotonic() - killed
        _, text = finish(worker0, timeout=10)
        print(f"every process ended {took:.1f}s after the coordinator was killed")
        assert took < heartbeat_timeout + 8, f"{took:.1f}s\n{procs.logs()}"
        assert codes["coordinator"] == -signal.SIGKILL
        assert all(codes[name] not in (0, None) for name in ("server", "worker0", "worker1")), (
            f"{codes}\n{text}\n{procs.logs()}")
        needle = f"the coordinator at {common['ZPS_COORDINATOR']} has not answered heartbeats"
        for name, output in (("server", procs.log("server")), ("worker0", text), ("worker1", procs.log("worker1"))):
            assert needle in output, f"{name} does not name the coordinator:\n{output}"
        assert wait_for_no_tagged(tag, within=10) == []
    finally:
        if worker0.stdout is not None:
            worker0.stdout.close()
