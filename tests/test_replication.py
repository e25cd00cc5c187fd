"""Replicated shards (--replicas R): placement, the checks, and real processes surviving a server killed mid-run.

A server killed with --replicas 1 must not end the job: its backups take over, the workers send again what was
not acknowledged, and each update is applied exactly once. BSP ends with the parameters of a run nobody killed;
ASP with integer gradients ends with exactly the sum of every push.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq
from safetensors.torch import load_file

from zps.protocol import replicas, transport
from zps.protocol.bodies import SeedBody
from zps.protocol.config import ConfigError, JobConfig
from zps.protocol.messages import PROTOCOL_VERSION, ErrorCode, KeyEntry, Kind, Message, parse_frames
from zps.ps._seeds import seed_messages

from .helpers import (
    ROOT,
    Procs,
    engine_and_two_fake_servers,
    finish,
    free_port,
    kill_tagged,
    local_cluster,
    role_pid,
    start,
    wait_for_line,
    wait_for_no_tagged,
)

TRAIN = str(ROOT / "tests" / "scripts" / "train_steps.py")
COUNT = str(ROOT / "tests" / "scripts" / "count_pushes.py")


# -- placement and settings (unit) --------------------------------------------------------------------------
@pytest.mark.unit
def test_placement_puts_each_copy_on_its_own_server_and_moves_homes_to_their_first_live_copy() -> None:
    assert replicas.copies(0, 0, 3) == [0]
    assert replicas.copies(2, 1, 3) == [2, 0]
    assert replicas.copies(1, 2, 3) == [1, 2, 0]
    for servers in range(1, 6):
        for count in range(servers):
            for home in range(servers):
                placed = replicas.copies(home, count, servers)
                assert len(set(placed)) == count + 1 and placed[0] == home  # never two copies on one server
    assert replicas.routes(1, 3, set()) == [0, 1, 2]
    assert replicas.routes(1, 3, {1}) == [0, 2, 2]
    assert replicas.routes(1, 3, {0}) == [1, 1, 2]
    assert replicas.routes(2, 4, {1, 2}) == [0, 3, 3, 3]
    assert replicas.routes(1, 3, {1, 2}) == [0, 0, 0]  # (server 1's chunks survive only if 0 was seeded in time)
    assert replicas.routes(1, 3, {0, 1, 2}) == [-1, -1, -1]
    # the copy sets grow by the next live server of the chain: re-replication restores R + 1 copies
    assert replicas.live_copies(0, 2, 4, {1}) == [0, 2, 3]
    assert replicas.live_copies(2, 1, 3, {0}) == [2, 1]
    assert replicas.live_copies(0, 1, 3, {0, 1}) == [2]


@pytest.mark.unit
def test_the_failover_notice_has_one_writer_and_one_reader() -> None:
    body = replicas.notice_body(2, {2, 0})
    assert replicas.parse_notice(body, 3) == (2, frozenset({0, 2}))
    assert replicas.parse_notice({"gone": 1}, 3) is None
    for bad in ({"failover": 1}, {"failover": {"version": -1, "dead": []}}, {"failover": {"version": 1, "dead": [3]}},
                {"failover": {"version": 1, "dead": "0"}}):
        with pytest.raises(ValueError):
            replicas.parse_notice(bad, 3)


@pytest.mark.unit
def test_replicas_must_fit_the_servers_and_are_refused_with_what_they_cannot_combine_with() -> None:
    assert JobConfig(num_servers=3, replicas=2).replicas == 2
    with pytest.raises(ConfigError, match=r"ZPS_REPLICAS \(--replicas\)=3: 3 replicas need at least 4 servers"):
        JobConfig(num_servers=3, replicas=3)
    with pytest.raises(ConfigError, match="must be >= 0"):
        JobConfig(num_servers=3, replicas=-1)
    with pytest.raises(ConfigError, match="cannot be combined with ZPS_CHECKPOINT_DIR"):
        JobConfig(num_servers=2, replicas=1, checkpoint_dir="/tmp/x")
    assert JobConfig(num_servers=2, replicas=1, secure=True).secure  # (refused before issue 22)


# -- the client's engine re-routes (two fake servers on inproc) ------------------------------------------------
@pytest.mark.cluster
def test_the_engine_sends_what_a_dead_server_never_answered_again_to_the_new_primary() -> None:
    with engine_and_two_fake_servers("reroute") as (engine, fakes, notices):
        push = Message(Kind.PUSH, src="worker:0", keys=[{"key": 3, "step": 4, "nf": 0}])
        future = engine.submit([(0, push)], "push of step 4")  # home 0: server 0 while it lives
        assert fakes[0].poll(5000)
        first = parse_frames(fakes[0].recv_multipart()[1:])  # server 0 takes it and dies without answering
        notices.append([1, 1])  # the coordinator's failover: home 0 is served by server 1
        assert fakes[1].poll(5000)
        identity, *frames = fakes[1].recv_multipart()
        again = parse_frames(frames)
        assert again.keys == first.keys and again.id != first.id  # the same push, a new request id
        fakes[1].send_multipart([identity, *Message(Kind.OK, id=again.id, src="server:1").to_frames()])
        assert future.result(timeout=10) == {}
        later = engine.submit([(0, Message(Kind.PULL, src="worker:0", keys=[{"key": 3, "step": 5, "nf": 0}]))],
                              "pull of step 5")
        assert fakes[1].poll(5000) and not fakes[0].poll(0)  # new requests for home 0 go to server 1 too
        identity, *frames = fakes[1].recv_multipart()
        fakes[1].send_multipart([identity, *Message(Kind.OK, id=parse_frames(frames).id, src="server:1").to_frames()])
        later.result(timeout=10)


# -- a malformed replication message (threads) -----------------------------------------------------------------
@pytest.mark.cluster
def test_a_malformed_replicate_request_is_answered_with_an_error_and_changes_nothing() -> None:
    with local_cluster(2, 1, "asp", replicas=1) as cluster:
        (client,) = cluster.clients()
        values = {"w": torch.zeros(8)}
        client.declare(values, ("SGD", [{"lr": 1.0}]))
        key = client.chunks("w")[0].key
        home = client.chunks("w")[0].server
        raw: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(client.topology.servers[1 - home])  # the backup
        entry = {"key": key, "version": 0, "hp": {"lr": 1.0}, "step": 0, "nf": 1, "codec": "none", "meta": {},
                 "bufs": [["float32", 8]]}
        ones = torch.ones(8).numpy().tobytes()
        cases = [
            ({"src": "worker:0"}, [entry], [ones], ErrorCode.BAD_HEADER),  # only a server replicates
            ({}, [{**entry, "key": 99}], [ones], ErrorCode.UNKNOWN_KEY),
            ({}, [{**entry, "version": "x"}], [ones], ErrorCode.BAD_HEADER),
            ({}, [{**entry, "hp": {"lr": float("nan")}}], [ones], ErrorCode.BAD_HEADER),
            ({}, [{**entry, "hp": {"lr": -1.0}}], [ones], ErrorCode.BAD_OPTIMIZER),
            ({}, [{**entry, "hp": {"betas": [0.9, 0.9]}}], [ones], ErrorCode.BAD_OPTIMIZER),
            ({}, [{**entry, "ng": 1}], [ones], ErrorCode.BAD_HEADER),  # no gradient, yet a frame
            ({}, [{**entry, "worker": 5}], [ones], ErrorCode.BAD_HEADER),
            ({}, [entry], [b"\0" * 5], ErrorCode.FRAME_SIZE),
            ({}, [{**entry, "version": 3}], [ones], ErrorCode.CONFLICT),  # it would skip updates
        ]
        try:
            for i, (head, keys, frames, code) in enumerate(cases):
                header = {"v": PROTOCOL_VERSION, "kind": Kind.REPLICATE.value, "id": i + 1,
                          "src": f"server:{home}", "keys": keys, **head}
                raw.send_multipart([msgpack.packb(header), *frames])
                assert raw.poll(10_000), f"case {i}: no answer"
                reply = parse_frames(raw.recv_multipart())
                assert reply.kind is Kind.ERROR and reply.body["code"] == code.value, (i, reply.body)
            client.pull(values, step=0).result(timeout=10)
            assert torch.equal(values["w"], torch.zeros(8))
            stats = client.stats()
            assert [s["replica_applied"] for s in stats] == [0, 0]
        finally:
            raw.close()
            client.close()


@pytest.mark.cluster
def test_a_seed_gives_a_server_new_to_a_key_the_primarys_whole_state_and_a_malformed_one_changes_nothing() -> None:
    """Re-replication's message: a server that holds no copy of a key takes one from a seed, bit for bit (values,
    Adam state, version, each worker's last push), once the coordinator's notice made it a copy; a malformed seed is
    refused naming its problem and declares nothing; a seed that names its own sender dead in a failover the
    coordinator has not announced waits for that notice and changes nothing (issue 22: a forged one fenced the real
    primary off)."""
    with local_cluster(3, 1, "asp", replicas=1) as cluster:
        (client,) = cluster.clients()
        client.declare({"w": torch.randn(64)}, ("Adam", [{"lr": 0.01}]))
        for step in range(3):
            client.push({"w": torch.randn(64)}, step=step).result(timeout=10)  # acknowledged: applied everywhere
        key, home = client.chunks("w")[0].key, client.chunks("w")[0].server
        primary, stranger = cluster.servers[home], cluster.servers[(home + 2) % 3]
        assert key not in stranger.shard.keys
        state = primary.shard.keys[key]
        # the coordinator fails the key's backup over, as far as the stranger knows: it becomes the new backup
        loop = cluster.servers[(home + 2) % 3]._loop
        assert loop is not None
        loop.rendezvous.notices.append(replicas.notice_body(1, {(home + 1) % 3}))
        end = time.monotonic() + 30
        while stranger.shard.replication.version != 1:
            assert time.monotonic() < end, "the stranger never took the notice"
            time.sleep(0.01)
        body: SeedBody = {"optimizer": "Adam", "groups": [{"lr": 0.01}],
                          "failover": {"version": 1, "dead": [(home + 1) % 3]}}
        (msg, carried), = seed_messages([state], primary.shard.keys.optimizer_state, body, f"server:{home}",
                                        iter(range(1, 99)), 1 << 30)
        assert carried == [key]
        raw: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(client.topology.servers[(home + 2) % 3])
        entry = msg.keys[0]
        frames = [bytes(f) for f in msg.frames]
        cases: list[tuple[str | None, list[KeyEntry], dict[str, Any], list[bytes], ErrorCode]] = [
            ("worker:0", [entry], dict(body), frames, ErrorCode.BAD_HEADER),  # only a server seeds
            (None, [entry], {**body, "failover": None}, frames, ErrorCode.BAD_HEADER),
            (None, [entry], {**body, "optimizer": "Foo"}, frames, ErrorCode.BAD_OPTIMIZER),
            (None, [{**entry, "numel": 1 << 40}], dict(body), frames, ErrorCode.BAD_HEADER),
            (None, [{**entry, "last": [[7, 1]]}], dict(body), frames, ErrorCode.BAD_HEADER),  # no worker 7
            (None, [{**entry, "ostate": [["exp_avg", "float32", [65]], *entry["ostate"][1:]]}], dict(body), frames,
             ErrorCode.SHAPE_MISMATCH),
            (None, [{**entry, "ostate": entry["ostate"][:-1]}], dict(body), frames, ErrorCode.FRAME_COUNT),
            (None, [entry], dict(body), [frames[0][:-4], *frames[1:]], ErrorCode.FRAME_SIZE),
        ]
        try:
            for i, (src, keys, seed_body, seed_frames, code) in enumerate(cases):
                bad = Message(Kind.SEED, id=100 + i, src=src or msg.src, keys=keys, body=seed_body, frames=seed_frames)
                transport.send(raw, bad)
                assert raw.poll(10_000), f"case {i}: no answer"
                reply = transport.recv(raw)
                assert reply.kind is Kind.ERROR and reply.body["code"] == code.value, (i, reply.body)
                assert key not in stranger.shard.keys, i
            transport.send(raw, msg)
            assert raw.poll(10_000) and transport.recv(raw).kind is Kind.OK
            copy = stranger.shard.keys[key]
            assert copy.param is not None and state.param is not None and torch.equal(copy.param, state.param)
            assert (copy.version, copy.hp, copy.last_step, copy.home) == (state.version, state.hp, state.last_step,
                                                                         state.home) and copy.version == 3
            theirs, ours = primary.shard.keys.optimizer_state(state), stranger.shard.keys.optimizer_state(copy)
            assert theirs.keys() == ours.keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(theirs[n], ours[n]) for n in theirs)
            dead = Message(Kind.SEED, id=200, src=msg.src, keys=msg.keys, frames=frames,
                           body={**body, "failover": {"version": 2, "dead": [home]}})
            transport.send(raw, dead)
            assert not raw.poll(1000)  # it waits for a notice of version 2, which the coordinator never sends
            assert stranger.shard.replication.dead == {(home + 1) % 3} and copy.version == 3
        finally:
            raw.close()
            client.close()


@pytest.mark.cluster
def test_a_server_without_replicas_refuses_replicate_requests() -> None:
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients()
        client.declare({"w": torch.zeros(8)}, ("SGD", [{"lr": 1.0}]))
        raw: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(client.topology.servers[0])
        try:
            entry = {"key": 0, "version": 0, "nf": 1, "codec": "none", "meta": {}, "bufs": [["float32", 8]]}
            header = {"v": PROTOCOL_VERSION, "kind": Kind.REPLICATE.value, "id": 1, "src": "server:0", "keys": [entry]}
            raw.send_multipart([msgpack.packb(header), torch.ones(8).numpy().tobytes()])
            assert raw.poll(10_000)
            reply = parse_frames(raw.recv_multipart())
            assert reply.kind is Kind.ERROR and reply.body["code"] == ErrorCode.BAD_KIND.value, reply.body
        finally:
            raw.close()
            client.close()


# -- real processes, a server killed mid-run ---------------------------------------------------------------------
def run_job(tag: str, args: list[str], timeout: float = 240) -> str:
    """``zps run --progress off ARGS``: its output, once it exited 0 and left no process behind."""
    code, text = finish(start(tag, ["run", "--progress", "off", *args]), timeout=timeout)
    assert code == 0, text
    assert wait_for_no_tagged(tag, within=10) == []
    return text


def run_counting_through_kills(tag: str, script: str, count: int, kills: str, steps: int, out: Path) -> str:
    """Run ``script`` (each step worker 0 pushes +1 and worker 1 +2 into everything it trains, then writes it to
    ``out``) over 3 servers in ASP with ``--replicas count`` and ``--kill kills``: every victim was failed over and
    every tensor ends at exactly 3 x ``steps`` (each push applied once, retries through the failovers included).
    The job's output."""
    text = run_job(tag, ["--servers", "3", "--workers", "2", "--mode", "asp", "--replicas", str(count), "--kill", kills,
                      script, "--steps", str(steps), "--out", str(out)])
    for kill in kills.split(","):
        victim = kill.split(":")[1].split("@")[0]
        assert f"server {victim} was killed by SIGKILL: its backups take over" in text, text
    for name, value in load_file(str(out)).items():
        assert torch.equal(value, torch.full_like(value, 3.0 * steps)), (name, value.unique())
    return text


# three workers: with rank-order sums a failed-over run ends with the uninterrupted run's bits, whatever order the
# pushes sent again arrive in
BSP_JOB = ["--servers", "3", "--workers", "3", "--mode", "bsp"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The parameters after 100 steps of tests/scripts/train_steps.py (BSP, Adam) that nobody interrupted."""
    out = tmp_path_factory.mktemp("reference") / "final.safetensors"
    tag = f"replication-reference-{os.getpid()}"
    try:
        run_job(tag, [*BSP_JOB, TRAIN, "--steps", "100", "--out", str(out)])
    finally:
        kill_tagged(tag)
    return load_file(str(out))


def _assert_close(reference: dict[str, torch.Tensor], out: Path) -> None:
    """Bit for bit."""
    got = load_file(str(out))
    assert reference.keys() == got.keys()
    for name in reference:
        assert torch.equal(reference[name], got[name]), (name, (reference[name] - got[name]).abs().max())


def _longest_step(text: str) -> float:
    return max(float(m) for m in re.findall(r"STEPTIME \d+ ([0-9.]+)", text))


@pytest.mark.cluster
def test_bsp_adam_goes_on_through_a_killed_server_and_ends_with_the_uninterrupted_parameters(
        tag: str, tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """Under --secure too: the servers forward and seed each other over CURVE, each with its own key."""
    out = tmp_path / "failover.safetensors"
    text = run_job(tag, [*BSP_JOB, "--secure", "--replicas", "1", "--kill", "server:1@50", TRAIN, "--steps", "100",
                      "--step-times", "--out", str(out)])
    assert "server 1 was killed by SIGKILL: its backups take over" in text, text
    assert re.search(r"FAILOVER: server:1 .* the chunks of server 1 are now served by server 2", text), text
    stall = _longest_step(text)
    print(f"longest step with server 1 killed at step 50 (3 servers, 2 workers, --replicas 1): {stall:.3f}s")
    assert stall < 10, text
    _assert_close(reference, out)


@pytest.mark.cluster
def test_bsp_completes_on_a_backup_the_step_a_killed_server_was_aggregating(
        tag: str, tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """Worker 1 computes 10x longer than worker 0: the servers hold worker 0's push of each step most of the time.
    Server 0 killed from outside then dies with a step half aggregated; its backup completes it from the pushes
    the workers send again."""
    out = tmp_path / "failover.safetensors"
    proc = start(tag, ["run", "--progress", "off", *BSP_JOB, "--replicas", "1", TRAIN, "--steps", "100",
                       "--step-times", "--step-time", "0.01", "--slow-rank", "1", "--slow-factor", "10", "--out",
                       str(out)])
    try:
        wait_for_line(proc, "[worker 0] STEP 50", timeout=120)
        os.kill(role_pid(tag, "server", 0), signal.SIGKILL)
        code, text = finish(proc, timeout=240)
    finally:
        proc.kill()
    assert code == 0, text
    assert "server 0 was killed by SIGKILL: its backups take over" in text, text
    resent = re.findall(r"sending (\d+) requests again", text)
    stall = _longest_step(text)
    print(f"longest step with server 0 killed mid-step: {stall:.3f}s; requests sent again per worker: {resent}")
    assert stall < 10, text
    _assert_close(reference, out)
    assert wait_for_no_tagged(tag, within=10) == []


@pytest.mark.cluster
def test_bsp_with_two_replicas_survives_two_servers_killed_one_after_the_other(
        tag: str, tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """--replicas 2 on 3 servers: the second death promotes the last copy, which the first promotion kept updated."""
    out = tmp_path / "failover.safetensors"
    text = run_job(tag, [*BSP_JOB, "--replicas", "2", "--kill", "server:0@30,server:2@60", TRAIN, "--steps", "100",
                      "--step-times", "--out", str(out)])
    assert "topology version 2: the chunks of server 0 are now served by server 1" in text, text
    print(f"longest step with two servers killed: {_longest_step(text):.3f}s")
    _assert_close(reference, out)


@pytest.mark.cluster
def test_bsp_with_one_replica_survives_two_servers_killed_with_re_replication_between_them(
        tag: str, tmp_path: Path, reference: dict[str, torch.Tensor]) -> None:
    """--replicas 1 on 3 servers: after the first death every chunk has one copy left; its primary seeds the next
    live server with it (values and Adam state), so the second death still leaves a complete copy of everything."""
    out = tmp_path / "failover.safetensors"
    text = run_job(tag, [*BSP_JOB, "--replicas", "1", "--kill", "server:0@30,server:1@60", TRAIN, "--steps", "100",
                      "--step-times", "--out", str(out)])
    assert re.search(r"RE-REPLICATED: the chunks of server 0 have 2 complete copies again \(servers \[1, 2\]", text)
    assert "topology version 2: the chunks of server 0 are now served by server 2" in text, text
    print(f"longest step with two servers killed, re-replicated between: {_longest_step(text):.3f}s")
    _assert_close(reference, out)


@pytest.mark.cluster
@pytest.mark.parametrize("count, kills", [(1, "server:0@30"), (1, "server:2@30"), (2, "server:0@20,server:1@40"),
                                          (1, "server:0@20,server:1@40")])
def test_asp_applies_every_acknowledged_push_exactly_once_through_a_killed_server(tag: str, tmp_path: Path,
                                                                                  count: int, kills: str) -> None:
    text = run_counting_through_kills(tag, COUNT, count, kills, 60, tmp_path / "final.safetensors")
    print(re.findall(r"DUPLICATES \d+", text))


@pytest.mark.cluster
@pytest.mark.parametrize("heartbeat_timeout", [2, 60])
def test_without_a_launcher_a_dead_server_is_failed_over_and_the_job_completes(tag: str, tmp_path: Path,
                                                                               heartbeat_timeout: int) -> None:
    """Scheduler mode (every role its own `zps node`): nobody sees server 1 exit. The workers' connections to it
    drop and its heartbeats stop: the coordinator fails it over once both are seen (or after --heartbeat-timeout,
    whichever comes first), and every push is still applied exactly once."""
    procs = Procs(tag, tmp_path)
    out = tmp_path / "final.safetensors"
    common = {"ZPS_COORDINATOR": f"127.0.0.1:{free_port()}", "ZPS_NUM_SERVERS": "2", "ZPS_NUM_WORKERS": "2",
              "ZPS_MODE": "asp", "ZPS_REPLICAS": "1", "ZPS_TIMEOUT": "120",
              "ZPS_HEARTBEAT_TIMEOUT": str(heartbeat_timeout)}
    procs.start("coordinator", {**common, "ZPS_ROLE": "coordinator"}, ["node"])
    for rank in range(2):
        procs.start(f"server{rank}", {**common, "ZPS_ROLE": "server", "ZPS_RANK": str(rank)}, ["node"])
    script = [COUNT, "--steps", "60", "--out", str(out)]
    worker0 = procs.start("worker0", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": "0"}, ["node", *script], pipe=True)
    procs.start("worker1", {**common, "ZPS_ROLE": "worker", "ZPS_RANK": "1"}, ["node", *script])
    wait_for_line(worker0, "STEP 20", timeout=90)
    os.kill(role_pid(tag, "server", 1), signal.SIGKILL)
    killed = time.monotonic()
    code, text = finish(worker0, timeout=90)
    took = time.monotonic() - killed
    assert code == 0, f"{text}\n{procs.logs()}"
    codes = procs.wait(timeout=60)
    assert codes["server1"] == -signal.SIGKILL
    assert {name: c for name, c in codes.items() if name not in ("server1", "worker0")} == {
        "coordinator": 0, "server0": 0, "worker1": 0}, procs.logs()
    assert "FAILOVER: server:1" in procs.log("coordinator"), procs.logs()
    if heartbeat_timeout > 30:  # the workers' lost connections, not the heartbeat timeout, gave it away
        assert "lost its connection to it and it has sent no heartbeat" in procs.log("coordinator"), procs.logs()
        assert took < 30, procs.logs()
    print(f"--heartbeat-timeout {heartbeat_timeout}: the job ended {took:.1f}s after server 1 was killed")
    for value in load_file(str(out)).values():
        assert torch.equal(value, torch.full_like(value, 180.0)), value.unique()
    assert wait_for_no_tagged(tag, within=10) == []
