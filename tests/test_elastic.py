"""Elastic workers (--max-workers): a worker joins a running job and counts from one step on every server.

The cluster test joins a third worker (``zps node``) to a running BSP job of tests/scripts/train_steps.py and
checks the final parameters against an in-process reference that averages workers 0-1 before the join step the
servers logged and 0-2 from it on: the same arithmetic, so any step averaged over the wrong membership shows.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from safetensors.torch import load_file

from zps.launcher.coordinator import Coordinator
from zps.protocol.config import JobConfig
from zps.protocol.messages import PROTOCOL_VERSION, ErrorCode, Kind, Message, ProtocolError, parse_frames
from zps.ps.consistency import BSP, make_consistency
from zps.ps.store import KeyState
from zps.telemetry.top import StatusClient

from .helpers import ROOT, Procs, finish, local_cluster, start, wait_for_line, wait_for_no_tagged

SCRIPT = str(ROOT / "tests" / "scripts" / "train_steps.py")


# -- the servers' rule (unit) ------------------------------------------------------------------------------------
def _key(version: int = 0) -> KeyState:
    state = KeyState(key=0, numel=2)
    state.version = version
    return state


@pytest.mark.unit
def test_bsp_counts_a_joiner_from_the_first_step_no_key_began_to_aggregate() -> None:
    bsp = make_consistency("bsp", 2)
    assert isinstance(bsp, BSP)
    idle, busy = _key(5), _key(5)
    assert bsp.push(busy, 0, 5, torch.ones(2), None) is None  # step 5 of ``busy`` has begun without the joiner
    start, updates = bsp.join(2, 5, [idle, busy])
    assert (start, updates) == (6, [])
    assert not bsp.check_push(idle, 2, 5)  # before its step: acknowledged, dropped
    assert bsp.expected(busy) == {0, 1} and bsp.expected(_key(6)) == {0, 1, 2}
    ready = bsp.push(busy, 1, 5, 3 * torch.ones(2), None)
    assert ready is not None and ready.grad is not None
    assert torch.equal(ready.grad, 2 * torch.ones(2))  # (1 + 3) / 2: the old membership


@pytest.mark.unit
def test_moving_a_joiner_later_completes_a_step_that_waited_only_for_it() -> None:
    bsp = make_consistency("bsp", 2)
    key = _key(4)
    assert bsp.join(2, 4, [key]) == (4, [])
    assert bsp.push(key, 0, 4, torch.ones(2), None) is None
    assert bsp.push(key, 1, 4, torch.zeros(2), None) is None  # waits for worker 2
    start, updates = bsp.join(2, 5, [key])  # another server could not take step 4: every server moves to 5
    grad = updates[0][1].grad
    assert start == 5 and len(updates) == 1 and grad is not None and torch.equal(grad, 0.5 * torch.ones(2))


@pytest.mark.unit
def test_ssp_gives_a_joiner_at_least_the_slowest_clock() -> None:
    ssp = make_consistency("ssp", 2, staleness=1)
    ssp.note_clock(0, 7)
    ssp.note_clock(1, 9)
    assert ssp.join(2, 0, [])[0] == 7 and ssp.slowest() == 7


# -- the coordinator (unit) --------------------------------------------------------------------------------------
def _register(coordinator: Coordinator, rank: int, pid: int) -> None:
    coordinator._register(b"id-%d" % pid, Message(Kind.REGISTER, id=1, src="worker:?",
                                                  body={"role": "worker", "rank": rank, "pid": pid, "host": "h"}))


@pytest.mark.unit
def test_the_coordinator_takes_joiners_up_to_max_workers_and_names_the_limit() -> None:
    coordinator = Coordinator(JobConfig(num_servers=1, num_workers=2, max_workers=3), port=0)
    try:
        coordinator._reply = lambda identity, msg: None  # type: ignore[method-assign]
        coordinator._register(b"s", Message(Kind.REGISTER, id=1, src="server:?", body={
            "role": "server", "rank": 0, "pid": 1, "host": "h", "address": "tcp://127.0.0.1:1"}))
        _register(coordinator, 2, 12)  # early: waits for the job to start, does not complete the cluster
        assert coordinator.state.value == "registering"
        _register(coordinator, 0, 10)
        _register(coordinator, 1, 11)
        assert coordinator.state.value == "running" and coordinator.live_workers() == {0, 1, 2}
        with pytest.raises(ProtocolError, match=r"up to 3 workers \(ranks 0-2, --max-workers\)") as exc:
            _register(coordinator, 3, 13)
        assert exc.value.code is ErrorCode.CONFLICT
        with pytest.raises(ProtocolError, match=r"all 3 worker ranks are taken \(--max-workers 3\)"):
            _register(coordinator, -1, 14)
    finally:
        coordinator.stop()


@pytest.mark.unit
def test_without_max_workers_a_late_worker_is_refused_as_before() -> None:
    coordinator = Coordinator(JobConfig(num_servers=1, num_workers=1), port=0)
    try:
        coordinator._reply = lambda identity, msg: None  # type: ignore[method-assign]
        coordinator._register(b"s", Message(Kind.REGISTER, id=1, src="server:?", body={
            "role": "server", "rank": 0, "pid": 1, "host": "h", "address": "tcp://127.0.0.1:1"}))
        _register(coordinator, 0, 10)
        with pytest.raises(ProtocolError, match="registered after the cluster was complete"):
            _register(coordinator, 1, 11)
    finally:
        coordinator.stop()


# -- a real job (cluster) ----------------------------------------------------------------------------------------
def reference(steps: int, join: int) -> dict[str, torch.Tensor]:
    """tests/scripts/train_steps.py's arithmetic in one process: workers 0-1 averaged before ``join``, 0-2 after."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        ranks = [0, 1, 2] if step >= join else [0, 1]
        total = [torch.zeros_like(p) for p in model.parameters()]
        for rank in ranks:
            g = torch.Generator().manual_seed(1000 * step + rank)
            x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
            model.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            for t, p in zip(total, model.parameters(), strict=True):
                assert p.grad is not None
                t += p.grad
        for t, p in zip(total, model.parameters(), strict=True):
            p.grad = t / len(ranks)
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def start_joiner(procs: Procs, coordinator: str, *script: str) -> subprocess.Popen:
    """A third worker for a running 2 servers x 2 workers job with --max-workers 3 (``zps node``, log "joiner")."""
    return procs.start("joiner", {"ZPS_ROLE": "worker", "ZPS_COORDINATOR": coordinator, "ZPS_NUM_SERVERS": "2",
                                  "ZPS_NUM_WORKERS": "2", "ZPS_MAX_WORKERS": "3"}, ["node", *script])


@pytest.mark.cluster
def test_a_worker_joins_a_running_bsp_job_and_counts_from_one_step_everywhere(tag: str, tmp_path: Path) -> None:
    steps, out = 300, tmp_path / "final.safetensors"
    job = start(tag, ["run", "--servers", "2", "--workers", "2", "--max-workers", "3", "--log-level", "INFO",
                      SCRIPT, "--steps", str(steps), "--step-time", "0.05", "--out", str(out)])
    procs = Procs(tag, tmp_path)
    try:
        head = wait_for_line(job, "STEP 30", timeout=120)
        coordinator = re.search(r"coordinator at (\S+:\d+)", head)
        assert coordinator, head
        joiner = start_joiner(procs, coordinator.group(1), SCRIPT, "--steps", str(steps), "--step-time", "0.05")
        code, text = finish(job, timeout=240)
        assert code == 0, text
        assert joiner.wait(timeout=30) == 0, procs.log("joiner")
    finally:
        for p in procs.procs.values():
            p.kill()
    # a server that answered an earlier step than another is asked again and logs the later one too: each server's
    # last word counts, and every server's is the step the joiner says it joined at
    last = dict(re.findall(r"(server:\d+): worker 2 joins the running job; from step (\d+)", text))
    said = re.search(r"worker:2 joins the running job at step (\d+)", procs.log("joiner"))
    assert said and sorted(last) == ["server:0", "server:1"], (text, procs.log("joiner"))
    join = int(said.group(1))
    assert {int(s) for s in last.values()} == {join}, text
    assert 30 <= join < steps - 20, text
    assert "worker:2 (host" in text and "joins the running job: 3 live workers [0, 1, 2]" in text, text
    assert f"STEP {join + 1}\n" in procs.log("joiner") and f"STEP {steps}\n" in procs.log("joiner")
    final, expected = load_file(str(out)), reference(steps, join)
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value, atol=1e-5, rtol=0)
    assert wait_for_no_tagged(tag, within=10) == []


@pytest.mark.slow
def test_digits_with_a_worker_joining_at_step_30_still_learns(tag: str, tmp_path: Path) -> None:
    digits = str(ROOT / "examples" / "digits.py")
    out = tmp_path / "result.json"
    # every step of the two first workers pauses 20 ms (--jitter): digits alone is over before a joiner starts
    job = start(tag, ["run", "--servers", "2", "--workers", "2", "--max-workers", "3", "--log-level", "INFO",
                      "--jitter", "1:0.02", digits, "--epochs", "20", "--out", str(out)])
    procs = Procs(tag, tmp_path)
    try:
        coordinator = re.search(r"coordinator at (\S+:\d+)", wait_for_line(job, "coordinator at", 120))
        assert coordinator, "no coordinator line"
        status = StatusClient(coordinator.group(1))
        deadline = time.monotonic() + 120
        while max((m.get("step") or 0 for m in status.status()["members"] if m["role"] == "worker"), default=0) < 30:
            assert time.monotonic() < deadline, "the job never reached step 30"
            time.sleep(0.05)  # polling the coordinator's view of the job's progress, bounded
        status.close()
        joiner = start_joiner(procs, coordinator.group(1), digits, "--epochs", "20")
        code, text = finish(job, timeout=400)
        assert code == 0, text
        assert joiner.wait(timeout=60) == 0, procs.log("joiner")
    finally:
        for p in procs.procs.values():
            p.kill()
    join = re.search(r"worker 2 joins the running job; from step (\d+)", text)
    assert join and int(join.group(1)) >= 30, text
    result = json.loads(out.read_text())
    assert result["test_accuracy"] >= 0.95, result


@pytest.mark.cluster
def test_bad_joins_are_refused_by_name_and_change_nothing() -> None:
    with local_cluster(1, 1, "bsp", max_workers=3) as cluster:
        (client,) = cluster.clients(shm=False)
        client.declare({"a": torch.zeros(4)}, ("SGD", [{"lr": 1.0}]))
        raw: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(client.topology.servers[0])

        def join(src: str, body: dict) -> Message:
            raw.send_multipart([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "join", "id": 5, "src": src,
                                               "body": body})])
            assert raw.poll(10_000), "the server did not answer"
            return parse_frames(raw.recv_multipart())

        consistency = cluster.servers[0].shard.consistency
        assert consistency is not None
        try:
            for src, body, words in (("worker:0", {"step": 1}, "a member of the job already"),
                                     ("worker:3", {"step": 1}, "N < 3"),
                                     ("worker:2", {"step": "1"}, "'step' must be a non-negative integer"),
                                     ("worker:2", {"step": -4}, "'step' must be a non-negative integer")):
                reply = join(src, body)
                assert reply.kind is Kind.ERROR and words in str(reply.body.get("reason")), (src, body, reply.body)
            assert consistency.live == {0}  # nobody was counted
            assert join("worker:2", {"step": 5}).body == {"step": 5}
            reply = join("worker:2", {"step": 2})
            assert reply.kind is Kind.ERROR and "moves only later" in str(reply.body.get("reason")), reply.body
            assert consistency.live == {0, 2}
        finally:
            raw.close()
            client.close()
