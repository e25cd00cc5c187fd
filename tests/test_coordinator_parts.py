"""The coordinator's collaborators without its socket: membership's states, failover, barriers, manifests. Each
sends through a list the test reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from zps.launcher.coordinator.barriers import Barriers
from zps.launcher.coordinator.failover import Failover
from zps.launcher.coordinator.manifests import Manifests
from zps.launcher.coordinator.membership import Member, Membership, Registration, State, read_registration
from zps.protocol.config import JobConfig
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError
from zps.telemetry.monitor import Monitor

pytestmark = pytest.mark.unit

Sent = list[tuple[bytes, Message]]


def _membership(job: JobConfig) -> tuple[Membership, Sent]:
    sent: Sent = []
    return Membership(job, lambda identity, msg: sent.append((identity, msg)), Monitor(1.5)), sent


def _server(rank: int, rejoin: bool = False) -> Registration:
    return Registration("server", rank, "h", 100 + rank, f"tcp://127.0.0.1:{2000 + rank}", rejoin)


def _worker(rank: int, rejoin: bool = False) -> Registration:
    return Registration("worker", rank, "h", 200 + rank, None, rejoin)


def test_a_registration_body_is_read_once_and_refused_by_name() -> None:
    assert read_registration({"role": "worker", "rank": 2, "host": "h", "pid": 7}) == Registration(
        "worker", 2, "h", 7, None, False)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"role": "scheduler"}, "cannot register role"), ({"role": "worker", "rank": "1"}, "rank"),
        ({"role": "server", "rank": 0}, "'address'"), ({"role": "worker", "rejoin": 1}, "'rejoin'")]
    for body, words in bad:
        with pytest.raises(ProtocolError, match=words) as exc:
            read_registration(body)
        assert exc.value.code is ErrorCode.BAD_HEADER


def test_membership_runs_once_complete_then_finishes() -> None:
    members, sent = _membership(JobConfig(num_servers=1, num_workers=2))
    members.register(b"s0", 1, _server(0))
    assert members.servers_ready.is_set() and [m.kind for _, m in sent] == [Kind.TOPOLOGY]  # a server serves at once
    members.register(b"w1", 1, _worker(-1))  # the first free rank
    assert members.state is State.REGISTERING and members.missing() == "1 of 2 workers (ranks 1)"
    members.register(b"w2", 1, _worker(-1))
    assert members.state is State.RUNNING and {i for i, m in sent if m.kind is Kind.TOPOLOGY} == {b"s0", b"w1", b"w2"}
    with pytest.raises(ProtocolError, match="after the cluster was complete"):
        members.register(b"w3", 1, _worker(0))
    members.members[("server", 0)].hb_identity = b"s0-hb"
    members.finish()
    assert members.state is State.FINISHED and sent[-1] == (b"s0-hb", Message(Kind.SHUTDOWN, src="coordinator"))


def test_a_restarted_membership_recovers_from_rejoins() -> None:
    members, sent = _membership(JobConfig(num_servers=1, num_workers=1))
    members.register(b"new", 5, _worker(0))  # a newcomer that registered first is refused once a member rejoins
    assert not members.rejoin(b"s0", 1, _server(0, rejoin=True))
    assert members.state is State.RECOVERING
    assert sent[0][0] == b"new" and sent[0][1].body["code"] == ErrorCode.RECOVERING.value
    with pytest.raises(ProtocolError, match="cannot join now"):
        members.register(b"new", 6, _worker(0))
    assert members.rejoin(b"w0", 1, _worker(0, rejoin=True))  # the job is whole again
    assert members.state is State.RUNNING and members.servers_ready.is_set()


def test_membership_fail_tells_the_waiting_and_the_registered() -> None:
    members, sent = _membership(JobConfig(num_servers=1, num_workers=2))
    members.register(b"s0", 1, _server(0))
    members.members[("server", 0)].hb_identity = b"s0-hb"
    members.register(b"w0", 4, _worker(0))
    members.fail("worker 1 never came")
    assert members.state is State.FAILED and members.error == "worker 1 never came"
    told = {identity: msg.body["code"] for identity, msg in sent if msg.kind is Kind.ERROR}
    assert told == {b"w0": ErrorCode.MISSING.value, b"s0-hb": ErrorCode.DEAD.value}


def test_failover_moves_a_home_to_its_backup_and_fails_when_every_copy_is_lost() -> None:
    sent: Sent = []
    failover = Failover(JobConfig(num_servers=3, num_workers=1, replicas=1), lambda i, m: sent.append((i, m)))
    servers = [Member("server", r, b"s%d" % r, 1, "h", r, "tcp://h:1", hb_identity=b"hb%d" % r) for r in range(3)]
    assert failover.server_failed(servers[1], "gone", servers) == []
    assert failover.version == 1 and failover.dead == {1} and failover.under_replicated() == [0, 1]
    assert {i for i, _ in sent} == {b"hb0", b"hb1", b"hb2"}  # (the dead one is not marked failed by this test)
    failover.replicated(2)  # server 2 serves home 1 and reports its copies on servers 2 and 0 complete
    assert failover.under_replicated() == [0]
    # home 0's new copy on server 2 is still being seeded: with server 0 gone too, no complete copy is left
    assert failover.server_failed(servers[0], "gone too", servers) == [0]


def test_a_suspect_is_failed_over_only_once_its_own_heartbeats_are_late() -> None:
    failover = Failover(JobConfig(num_servers=2, num_workers=1, replicas=1, heartbeat_interval=0.5), lambda i, m: None)
    server = Member("server", 1, b"s1", 1, "h", 1, "tcp://h:1", last_seen=100.0)
    failover.suspect([1, 7, "x"], since=100.5, who="worker:0")
    assert failover.due_suspects(101.0, {1: server}, running=True) == []  # 1 s: not yet three intervals late
    assert failover.due_suspects(102.0, {1: server}, running=False) == []  # recovering: kept, not acted on
    due = failover.due_suspects(102.0, {1: server}, running=True)
    assert [(m.rank, "worker:0 lost its connection" in why) for m, why in due] == [(1, True)]
    assert failover.due_suspects(103.0, {1: server}, running=True) == []  # once


def test_barriers_release_when_every_live_worker_arrived_and_expire_naming_the_missing() -> None:
    sent: Sent = []
    barriers = Barriers(timeout=10.0, send=lambda i, m: sent.append((i, m)))
    barriers.arrive("epoch", 0, b"w0", 1)
    barriers.release({0, 1})
    assert sent == []
    barriers.arrive("epoch", 1, b"w1", 2)
    barriers.release({0, 1})
    assert [(i, m.kind, m.id) for i, m in sent] == [(b"w0", Kind.OK, 1), (b"w1", Kind.OK, 2)]
    barriers.arrive("late", 0, b"w0", 3)
    started = barriers.open["late"][0]
    barriers.expire(started + 11.0, {0, 1})
    assert sent[-1][1].body["code"] == ErrorCode.TIMEOUT.value and "workers [1]" in sent[-1][1].body["reason"]
    with pytest.raises(ProtocolError, match="at most 256"):
        barriers.arrive("x" * 257, 0, b"w0", 4)


def test_a_manifest_is_written_once_every_part_is_in(tmp_path: Path) -> None:
    manifests = Manifests(JobConfig(num_servers=2, num_workers=2, checkpoint_dir=str(tmp_path)))
    manifests.saved("worker", 0, 5, 10, {"servers": [0, 1], "step": 5})
    manifests.saved("server", 0, 5, 10, {})
    manifests.saved("server", 1, 5, 10, {})
    manifests.complete({0, 1})  # worker 1 still trains and owes its part
    assert manifests.last == 0 and not list(tmp_path.rglob("MANIFEST.json"))
    manifests.saved("worker", 1, 5, 10, {"step": 5})
    manifests.complete({0, 1})
    assert manifests.last == 5 and manifests.parts == {}
    (manifest,) = list(tmp_path.rglob("MANIFEST.json"))
    assert json.loads(manifest.read_text())["checkpoint"] == 5
