"""The server's handlers without a coordinator: the shard service (:class:`zps.ps.shard.Shard`) fed messages
directly, with no socket at all (every message goes through its wire form first), and the loop's guard against a
fake client on an inproc socket."""

from __future__ import annotations

import collections
import itertools
import threading
from typing import Any

import pytest
import torch
import zmq

from zps.protocol import replicas
from zps.protocol.codecs import make_codec
from zps.protocol.config import Config, JobConfig
from zps.protocol.messages import ErrorCode, KeyEntry, Kind, Message, ProtocolError, parse_frames
from zps.protocol.rendezvous import Topology
from zps.protocol.tensors import encode_entry, from_buffer
from zps.ps._guard import Guard
from zps.ps._metrics import ServerMetrics
from zps.ps._pending import Reply
from zps.ps._replicas import Replication
from zps.ps.server import Loop, Server
from zps.ps.shard import Shard

pytestmark = pytest.mark.unit

_IDS = itertools.count(1)
NONE = make_codec("none")
SGD = ("SGD", [{"lr": 1.0}])


def wire(msg: Message) -> Message:
    """``msg`` as a server reads it off the wire (packed, then parsed and checked)."""
    return parse_frames([bytes(f) for f in msg.to_frames()])


def ident(worker: int) -> bytes:
    return f"peer-{worker}".encode()


class Harness:
    """One shard service with no socket: ``send`` collects what it sends to other servers (``--replicas``)."""

    def __init__(self, mode: str = "bsp", workers: int = 2, servers: int = 1, rank: int = 0, replicas: int = 0,
                 **job: Any) -> None:
        self.job = JobConfig(num_servers=servers, num_workers=workers, mode=mode, replicas=replicas, timeout=30.0,
                             **job)
        topology = Topology(role="server", rank=rank, num_servers=servers, num_workers=workers,
                            servers=tuple(f"tcp://127.0.0.1:{9000 + s}" for s in range(servers)), mode=mode,
                            staleness=job.get("staleness", 0))
        self.name = f"server:{rank}"
        self.metrics = ServerMetrics(self.name)
        self.forwarded: list[tuple[int, Message]] = []
        replication = Replication(rank, servers, replicas, self.name, lambda s, m: self.forwarded.append((s, m)),
                                  self.metrics)
        self.shard = Shard(self.name, self.job, topology, self.metrics, Guard(self.name, self.metrics), replication)

    def ask(self, msg: Message, identity: bytes | None = None) -> list[Reply]:
        worker = msg.src.partition(":")[2]
        return self.shard.handle(identity or ident(int(worker) if worker.isdigit() else 99), wire(msg))

    def refused(self, msg: Message) -> ErrorCode:
        with pytest.raises(ProtocolError) as info:
            self.ask(msg)
        return info.value.code

    def declare(self, values: dict[int, torch.Tensor], workers: range | None = None) -> None:
        for worker in workers or range(self.job.num_workers):
            (reply,) = self.ask(init(worker, values)) if worker == 0 else self.ask(init(worker, values, False))
            assert reply[1].kind is Kind.OK


def init(worker: int, values: dict[int, torch.Tensor], with_values: bool = True, optimizer: tuple[str, list[Any]] = SGD,
         **fields: Any) -> Message:
    keys: list[KeyEntry] = []
    frames: list[Any] = []
    for key, tensor in values.items():
        entry: KeyEntry = {"key": key, "name": f"p{key}", "offset": 0, "numel": tensor.numel(), "dtype": "float32",
                           "group": 0, "nf": 0, **fields}  # type: ignore[typeddict-item]
        if with_values:
            encoded, bufs = encode_entry(NONE, tensor)
            entry.update(encoded)
            frames += bufs
        keys.append(entry)
    body = {"optimizer": optimizer[0], "groups": optimizer[1]} if with_values else {}
    return Message(Kind.INIT, id=next(_IDS), src=f"worker:{worker}", keys=keys, body=body, frames=frames)


def push(worker: int, grads: dict[int, torch.Tensor], step: int, kind: Kind = Kind.PUSH,
         body: dict[str, Any] | None = None, src: str | None = None) -> Message:
    keys: list[KeyEntry] = []
    frames: list[Any] = []
    for key, grad in grads.items():
        entry, bufs = encode_entry(NONE, grad)
        entry["key"], entry["step"] = key, step
        keys.append(entry)
        frames += bufs
    return Message(kind, id=next(_IDS), src=src or f"worker:{worker}", keys=keys, body=body or {}, frames=frames)


def pull(worker: int, keys: list[int], step: int) -> Message:
    return Message(Kind.PULL, id=next(_IDS), src=f"worker:{worker}", keys=[{"key": k, "step": step, "nf": 0}
                                                                              for k in keys])


def values_of(reply: Message) -> dict[int, torch.Tensor]:
    assert reply.kind is Kind.VALUES, reply.body
    return {entry["key"]: from_buffer(frames[0], torch.float32, entry["bufs"][0][1], "test").clone()
            for entry, frames in reply.entries()}


def stats(h: Harness) -> dict[str, Any]:
    ((_, reply),) = h.ask(Message(Kind.STATS, id=next(_IDS), src="worker:0"))
    return reply.body


# -- INIT ------------------------------------------------------------------------------------------------------------
def test_init_sets_values_and_a_declare_waits_for_rank_0s() -> None:
    h = Harness()
    assert h.ask(init(1, {3: torch.zeros(4)}, with_values=False)) == []  # rank 1 first: no values yet, it waits
    assert len(h.shard.pending) == 1 and h.shard.keys[3].param is None
    replies = h.ask(init(0, {3: torch.arange(4.0)}))
    assert [(who, m.kind, m.body["step"]) for who, m in replies] == [(ident(0), Kind.OK, 0), (ident(1), Kind.OK, 0)]
    assert torch.equal(h.shard.keys[3].param, torch.arange(4.0)) and h.shard.keys.bytes == 16  # type: ignore[arg-type]
    assert len(h.shard.pending) == 0


def test_init_refuses_a_key_declared_otherwise_and_changes_nothing() -> None:
    h = Harness()
    h.declare({3: torch.zeros(4)})
    assert h.refused(init(1, {3: torch.zeros(5), 4: torch.zeros(2)}, with_values=False)) is ErrorCode.CONFLICT
    assert 4 not in h.shard.keys and h.shard.keys[3].numel == 4  # the whole message was refused
    assert h.refused(init(0, {5: torch.zeros(2)}, optimizer=("LBFGS", [{}]))) is ErrorCode.BAD_OPTIMIZER
    assert h.refused(init(0, {5: torch.zeros(2)}, group=7)) is ErrorCode.BAD_HEADER  # no group 7 of 1
    assert 5 not in h.shard.keys


# -- PUSH, PUSH_PULL, PULL ---------------------------------------------------------------------------------------------
def test_asp_push_applies_once_and_a_retried_push_is_acknowledged_only() -> None:
    h = Harness("asp", workers=1)
    h.declare({1: torch.ones(3)})
    retried = push(0, {1: torch.full((3,), 0.25)}, 0)
    for _ in range(2):
        ((who, reply),) = h.ask(retried)
        assert who == ident(0) and reply.kind is Kind.OK
    torch.testing.assert_close(h.shard.keys[1].param, torch.full((3,), 0.75), atol=0, rtol=0)
    record = stats(h)
    assert (record["pushes_applied"], record["duplicates"], h.shard.keys[1].version) == (1, 1, 1)


def test_a_push_with_one_bad_key_changes_nothing() -> None:
    h = Harness("asp", workers=1)
    h.declare({1: torch.ones(3), 2: torch.ones(2)})
    assert h.refused(push(0, {1: torch.ones(3), 2: torch.ones(5)}, 0)) is ErrorCode.SHAPE_MISMATCH
    assert h.refused(push(0, {1: torch.ones(3), 9: torch.ones(2)}, 0)) is ErrorCode.UNKNOWN_KEY
    assert h.refused(push(0, {1: torch.ones(3)}, 0, body={"hp": [{"lr": float("nan")}]})) is ErrorCode.BAD_HEADER
    assert [s.version for s in h.shard.keys.values()] == [0, 0]
    assert torch.equal(h.shard.keys[1].param, torch.ones(3))  # type: ignore[arg-type]
    assert stats(h)["pushes_applied"] == 0


def test_bsp_push_pull_waits_for_every_worker_then_answers_both_with_the_mean_applied() -> None:
    h = Harness("bsp", workers=2)
    h.declare({1: torch.zeros(2)})
    hp = {"hp": [{"lr": 0.5}]}  # every worker's step: the same hyper-parameters
    assert h.ask(push(0, {1: torch.tensor([1.0, 2.0])}, 0, Kind.PUSH_PULL, body=hp)) == []  # its pull waits
    replies = h.ask(push(1, {1: torch.tensor([3.0, 4.0])}, 0, Kind.PUSH_PULL, body=hp))
    assert [who for who, _ in replies] == [ident(1), ident(0)]  # the completing request's reply, then the released
    for _, reply in replies:
        torch.testing.assert_close(values_of(reply)[1], torch.tensor([-1.0, -1.5]), atol=0, rtol=0)
        assert reply.keys[0]["version"] == 1
    assert len(h.shard.pending) == 0 and h.shard.keys[1].hp == {"lr": 0.5}


def test_an_inspect_that_came_before_the_last_push_of_a_held_step_is_answered_when_it_completes() -> None:
    """Clipping under BSP: a worker's INSPECT of step 0 can reach a server before another worker's push completes
    the step. The completed aggregate is held (not applied) until its commit, so no update marks the key changed;
    the INSPECT waiting on it must be answered all the same (it waited until the job's timeout: a 3-worker clip
    job hung on a loaded host)."""
    h = Harness("bsp", workers=2)
    h.declare({1: torch.zeros(2)})
    hold = {"hold": True}
    assert h.ask(push(0, {1: torch.tensor([3.0, 0.0])}, 0, body=hold))[0][1].kind is Kind.OK
    asked = Message(Kind.INSPECT, id=next(_IDS), src="worker:0", keys=[{"key": 1, "step": 0, "nf": 0}],
                    body={"norm": 2.0})
    assert h.ask(asked) == []  # worker 1's push is still to come
    replies = h.ask(push(1, {1: torch.tensor([5.0, 6.0])}, 0, body=hold))
    assert [(who, m.kind) for who, m in replies] == [(ident(1), Kind.OK), (ident(0), Kind.OK)], replies
    (key, norm, finite), = replies[1][1].body["keys"]
    assert key == 1 and finite and norm == pytest.approx(float(torch.tensor([4.0, 3.0]).norm()))  # of the mean
    assert len(h.shard.pending) == 0 and h.shard.keys[1].version == 0  # held, not applied: the commit applies it


def test_bsp_pull_is_answered_at_its_version_and_waits_for_a_later_one() -> None:
    h = Harness("bsp", workers=2)
    h.declare({1: torch.full((2,), 5.0)})
    ((_, now),) = h.ask(pull(1, [1], 0))
    torch.testing.assert_close(values_of(now)[1], torch.full((2,), 5.0), atol=0, rtol=0)
    assert h.ask(pull(1, [1], 1)) == []
    assert h.ask(push(0, {1: torch.ones(2)}, 0))[0][1].kind is Kind.OK
    replies = h.ask(push(1, {1: torch.ones(2)}, 0))
    assert [(who, m.kind) for who, m in replies] == [(ident(1), Kind.OK), (ident(1), Kind.VALUES)]
    torch.testing.assert_close(values_of(replies[1][1])[1], torch.full((2,), 4.0), atol=0, rtol=0)


def test_a_push_ahead_of_the_step_is_refused_and_a_pull_past_its_deadline_names_what_it_waits_for() -> None:
    h = Harness("bsp", workers=2)
    h.declare({1: torch.zeros(2)})
    assert h.refused(push(0, {1: torch.ones(2)}, 3)) is ErrorCode.STEP_AHEAD
    assert h.ask(pull(0, [1], 1)) == []
    for waiting in h.shard.pending.items.values():
        waiting.deadline = 0.0  # its time is up
    ((who, reply),) = h.shard.pending.expire(30.0)
    assert who == ident(0) and reply.body["code"] == ErrorCode.TIMEOUT.value
    assert "waits for workers [0, 1]" in reply.body["reason"]


def test_a_replacement_starting_a_step_some_keys_applied_pulls_the_values_that_step_began_with() -> None:
    """--on-worker-failure restart: worker 1 died after pushing key 1 of step 0 but not key 2; key 1 applied step 0,
    so its replacement (starting at step 0, the lowest version) must get key 1's values of version 0, or its gradient
    for key 2 is another one than the dead worker's (and than a failure-free run's)."""
    h = Harness("bsp", workers=2, on_worker_failure="restart", max_restarts=1)
    h.declare({1: torch.full((2,), 5.0), 2: torch.full((3,), 7.0)})
    h.ask(push(0, {1: torch.ones(2), 2: torch.ones(3)}, 0))
    h.ask(push(1, {1: torch.full((2,), 3.0)}, 0))
    assert (h.shard.keys[1].version, h.shard.keys[2].version) == (1, 0)
    ((_, start),) = h.ask(init(1, {1: torch.zeros(2), 2: torch.zeros(3)}, with_values=False))
    assert start.body["step"] == 0
    for key, values in ((1, torch.full((2,), 5.0)), (2, torch.full((3,), 7.0))):
        ((_, began),) = h.ask(pull(1, [key], 0))
        torch.testing.assert_close(values_of(began)[key], values, atol=0, rtol=0)
        assert began.keys[0]["version"] == 0
    ((_, now),) = h.ask(pull(1, [1], 1))  # the step after: the values as they are
    torch.testing.assert_close(values_of(now)[1], torch.full((2,), 3.0), atol=0, rtol=0)
    plain = Harness("bsp", workers=2)  # no worker is ever replaced: nothing kept
    plain.declare({1: torch.zeros(2)})
    for worker in range(2):
        plain.ask(push(worker, {1: torch.ones(2)}, 0))
    assert plain.shard.keys[1].version == 1 and plain.shard.keys[1].before is None


# -- JOIN, LEAVE, notices ----------------------------------------------------------------------------------------------
def test_join_counts_a_worker_beyond_workers_from_a_step() -> None:
    h = Harness("bsp", workers=1, max_workers=2)
    h.declare({1: torch.zeros(2)}, range(1))
    ((_, reply),) = h.ask(Message(Kind.JOIN, id=next(_IDS), src="worker:1", body={"step": 2}))
    assert reply.kind is Kind.OK and reply.body == {"step": 2} and h.shard.consistency.live == {0, 1}
    assert h.refused(Message(Kind.JOIN, id=next(_IDS), src="worker:0", body={"step": 2})) is ErrorCode.CONFLICT
    assert h.refused(Message(Kind.JOIN, id=next(_IDS), src="worker:1", body={"step": -1})) is ErrorCode.BAD_HEADER
    assert h.refused(Message(Kind.JOIN, id=next(_IDS), src="worker:1", body={"step": 1})) is ErrorCode.CONFLICT


def test_leave_completes_the_step_that_waited_for_the_worker_and_releases_its_pulls() -> None:
    h = Harness("bsp", workers=2)
    h.declare({1: torch.zeros(2)})
    assert h.ask(push(0, {1: torch.ones(2)}, 0, Kind.PUSH_PULL)) == []
    replies = h.ask(Message(Kind.LEAVE, id=next(_IDS), src="worker:1"))
    assert [(who, m.kind) for who, m in replies] == [(ident(1), Kind.OK), (ident(0), Kind.VALUES)]
    torch.testing.assert_close(values_of(replies[1][1])[1], torch.full((2,), -1.0), atol=0, rtol=0)
    assert h.shard.consistency.live == {0}


def test_a_notice_that_a_worker_failed_goes_on_without_it() -> None:
    h = Harness("bsp", workers=2)
    h.declare({1: torch.zeros(2)})
    assert h.ask(push(1, {1: torch.ones(2)}, 0, Kind.PUSH_PULL)) == []
    replies = h.shard.notice({"gone": 0, "why": "killed", "workers": {"x": 1, "1": 4242}})
    assert [(who, m.kind) for who, m in replies] == [(ident(1), Kind.VALUES)]
    assert h.shard.consistency.live == {1} and h.shard.segments.pids == {1: 4242}  # (the malformed pid dropped)


# -- STATS and the bad-kind path -------------------------------------------------------------------------------------
def test_stats_answers_the_jobs_workers_only() -> None:
    h = Harness("asp", workers=1)
    h.declare({1: torch.zeros(2), 2: torch.zeros(3)})
    h.ask(push(0, {1: torch.ones(2)}, 0))
    record = stats(h)
    assert (record["mode"], record["keys"], record["versions"], record["pushes_applied"]) == ("asp", 2, [0, 1], 1)
    assert record["bytes_in"] == 0  # (the loop counts what crosses its socket, not the service)
    assert h.refused(Message(Kind.STATS, id=next(_IDS), src="coordinator")) is ErrorCode.BAD_HEADER
    assert h.refused(Message(Kind.STATS, id=next(_IDS), src="worker:1")) is ErrorCode.BAD_HEADER  # no worker 1


def test_stats_heartbeats_prometheus_and_metrics_out_read_one_count() -> None:
    h = Harness("asp", workers=1)
    h.declare({1: torch.zeros(2)})
    for step in (0, 1, 1):  # two updates and one duplicate
        h.ask(push(0, {1: torch.ones(2)}, step))
    record, report, totals = stats(h), h.metrics.report(), h.metrics.totals()
    scraped = {m.name: m.samples[0].value for m in h.metrics.registry.collect()
               if m.name in ("zps_server_updates", "zps_server_duplicate_pushes", "zps_server_keys")}
    assert record["pushes_applied"] == report["updates"] == totals["updates"] == scraped["zps_server_updates"] == 2
    assert record["duplicates"] == scraped["zps_server_duplicate_pushes"] == 1
    assert record["keys"] == report["keys"] == scraped["zps_server_keys"] == 1


def test_a_kind_a_server_does_not_serve_is_refused() -> None:
    h = Harness()
    for kind in (Kind.REGISTER, Kind.VALUES, Kind.HEARTBEAT):
        assert h.refused(Message(kind, id=next(_IDS), src="worker:0")) is ErrorCode.BAD_KIND
    assert h.refused(Message(Kind.REPLICATE, id=next(_IDS), src="server:0")) is ErrorCode.BAD_KIND  # no --replicas
    assert h.refused(Message(Kind.SEED, id=next(_IDS), src="server:0")) is ErrorCode.BAD_KIND


# -- REPLICATE and SEED: a primary and a backup, wired by hand -------------------------------------------------------
def _pair(mode: str = "asp") -> tuple[Harness, Harness]:
    primary, backup = (Harness(mode, workers=1, servers=2, rank=r, replicas=1) for r in (0, 1))
    for h in (primary, backup):  # every live copy is declared, with rank 0's values
        (reply,) = h.ask(init(0, {1: torch.ones(4)}, home=0))
        assert reply[1].kind is Kind.OK
    return primary, backup


def _deliver(primary: Harness, backup: Harness) -> list[Reply]:
    """The primary's forwards reach the backup; its answers reach the primary: the replies that released."""
    released = []
    while primary.forwarded:
        to, msg = primary.forwarded.pop(0)
        assert to == 1
        ((_, answer),) = backup.ask(msg, identity=b"server-0")
        released += primary.shard.acknowledged(primary.shard.replication.answered(1, wire(answer)))
    return released


def test_replicate_applies_a_primarys_update_once_and_its_push_is_answered_once_the_backup_holds_it() -> None:
    primary, backup = _pair()
    assert primary.ask(push(0, {1: torch.full((4,), 0.5)}, 0, body={"hp": [{"lr": 2.0}]})) == []  # waits for backup
    (forward,) = [m for _, m in primary.forwarded]
    released = _deliver(primary, backup)
    assert [(who, m.kind) for who, m in released] == [(ident(0), Kind.OK)]
    for h in (primary, backup):
        torch.testing.assert_close(h.shard.keys[1].param, torch.zeros(4), atol=0, rtol=0)
        assert (h.shard.keys[1].version, h.shard.keys[1].hp, h.shard.keys[1].last_step) == (1, {"lr": 2.0}, {0: 0})
    ((_, again),) = backup.ask(forward, identity=b"server-0")  # a late repeat: acknowledged, not applied again
    assert again.kind is Kind.OK and backup.shard.keys[1].version == 1
    assert backup.metrics.replication["replica_duplicates"] == 1 and backup.metrics.replication["replica_applied"] == 1
    assert backup.refused(Message(Kind.REPLICATE, id=next(_IDS), src="worker:0", keys=forward.keys,
                                  frames=forward.frames)) is ErrorCode.BAD_HEADER  # only a server replicates


def test_a_seed_gives_a_backup_the_primarys_whole_state_and_waits_for_the_failover_it_names() -> None:
    primary, backup = _pair()
    for step in range(2):
        primary.ask(push(0, {1: torch.full((4,), 0.5)}, step))
        _deliver(primary, backup)
    primary.shard.replication.reseed = {1: {1}}
    primary.shard.send_seeds()
    ((_, seed),) = primary.forwarded
    assert seed.kind is Kind.SEED
    fresh = Harness("asp", workers=1, servers=2, rank=1, replicas=1)  # a backup new to the key: it declares it
    ((_, reply),) = fresh.ask(seed, identity=b"server-0")
    assert reply.kind is Kind.OK
    copy, state = fresh.shard.keys[1], primary.shard.keys[1]
    assert torch.equal(copy.param, state.param) and (copy.version, copy.last_step) == (2, {0: 1})  # type: ignore[arg-type]
    assert copy.before is None and state.before is None  # ASP keeps no values one version back
    # a seed that names its own sender dead in a failover this server has not heard of (issue 22: a forged one
    # fenced the real primary off): it waits for the coordinator's notice and fences nobody meanwhile
    dead = Message(Kind.SEED, id=next(_IDS), src="server:0", keys=seed.keys, frames=seed.frames,
                   body={**seed.body, "failover": {"version": 1, "dead": [0]}})
    assert fresh.ask(dead, identity=b"server-0") == [] and len(fresh.shard.pending) == 1
    assert not fresh.shard.replication.dead
    primary.ask(push(0, {1: torch.full((4,), 0.5)}, 2))
    (_, forward), = primary.forwarded[1:]
    ((_, applied),) = fresh.ask(forward, identity=b"server-0")  # the real primary's updates still apply
    assert applied.kind is Kind.OK and fresh.shard.keys[1].version == 3
    # the coordinator's notice comes: now the seed is checked against it, and its sender is dead there
    ((who, refused),) = fresh.shard.notice(replicas.notice_body(1, {0}))
    assert who == b"server-0" and refused.body["code"] == ErrorCode.DEAD.value, refused.body
    assert fresh.shard.keys[1].version == 3 and len(fresh.shard.pending) == 0


def test_only_the_primary_the_coordinator_named_replicates_to_or_seeds_a_backup_and_a_refusal_leaks_nothing() -> None:
    """Issue 22: a forged REPLICATE at the backup's version made it skip the real primary's update, and CONFLICT
    texts told the forger the versions it needed."""
    servers = [Harness("asp", workers=1, servers=3, rank=r, replicas=1) for r in range(3)]
    for h in servers:
        (reply,) = h.ask(init(0, {1: torch.ones(4)}, home=0))  # home 0: copies on servers 0 and 1
        assert reply[1].kind is Kind.OK
    primary, backup, stranger = servers
    primary.ask(push(0, {1: torch.full((4,), 0.5)}, 0))
    (_, forward), = primary.forwarded
    for src in ("server:2", "server:1"):  # not the primary (server 1 is the backup itself)
        forged = Message(Kind.REPLICATE, id=next(_IDS), src=src, keys=forward.keys, frames=forward.frames)
        with pytest.raises(ProtocolError) as info:
            backup.ask(forged)
        assert info.value.code is ErrorCode.CONFLICT and "not the primary" in info.value.reason
    assert backup.shard.keys[1].version == 0
    ahead = Message(Kind.REPLICATE, id=next(_IDS), src="server:0", keys=[{**forward.keys[0], "version": 7}],
                    frames=forward.frames)
    with pytest.raises(ProtocolError) as info:
        backup.ask(ahead)
    reason = info.value.reason  # no version, name or size of the key
    assert info.value.code is ErrorCode.CONFLICT and not [t for t in ("7", "p1", "[0:4]", "version 0") if t in reason]
    with pytest.raises(ProtocolError) as info:  # a stranger to the key is no copy of it: it takes no update
        stranger.ask(Message(Kind.REPLICATE, id=next(_IDS), src="server:0", keys=forward.keys, frames=forward.frames))
    assert info.value.code in (ErrorCode.CONFLICT, ErrorCode.UNKNOWN_KEY)
    ((_, ok),) = backup.ask(forward, identity=b"server-0")
    assert ok.kind is Kind.OK and backup.shard.keys[1].version == 1
    primary.shard.replication.reseed = {1: {1}}
    primary.shard.send_seeds()
    (_, seed), = primary.forwarded[1:]
    forged_seed = Message(Kind.SEED, id=next(_IDS), src="server:2", keys=seed.keys, frames=seed.frames, body=seed.body)
    with pytest.raises(ProtocolError) as info:
        backup.ask(forged_seed)
    assert info.value.code is ErrorCode.CONFLICT
    other = Message(Kind.SEED, id=next(_IDS), src="server:0", keys=seed.keys, frames=seed.frames,
                    body={**seed.body, "failover": {"version": 0, "dead": [2]}})  # not the topology announced
    with pytest.raises(ProtocolError) as info:
        backup.ask(other)
    assert info.value.code is ErrorCode.CONFLICT
    assert backup.shard.keys[1].version == 1 and backup.metrics.replication["seeds_taken"] == 0


def test_a_server_failed_over_answers_what_waits_there_moved_not_dead() -> None:
    """Issue 22: a live server that learns it was failed over answered its waiting pulls with ERROR dead, which
    ended the job; MOVED tells the worker to send them again to the new primary."""
    primary, _ = _pair("bsp")
    waiting = primary.ask(pull(0, [1], 3))  # a pull of a future step waits
    assert waiting == [] and len(primary.shard.pending) == 1
    assert primary.shard.notice(replicas.notice_body(1, {0})) == []  # the coordinator failed this server over
    assert primary.shard.replication.fenced is not None
    ((_, moved),) = primary.shard.pending.fail_all("failed over", ErrorCode.MOVED)
    assert moved.body["code"] == ErrorCode.MOVED.value


def test_a_seed_carries_the_values_one_version_back_where_they_are_kept() -> None:
    """A backup seeded after a failover may become the primary that a replacement worker pulls a step from."""
    primary, backup = (Harness("bsp", workers=1, servers=2, rank=r, replicas=1, on_worker_failure="restart",
                               max_restarts=1) for r in (0, 1))
    for h in (primary, backup):
        h.ask(init(0, {1: torch.ones(4)}, home=0))
    primary.ask(push(0, {1: torch.full((4,), 0.5)}, 0))
    _deliver(primary, backup)
    assert backup.shard.keys[1].before is not None and torch.equal(backup.shard.keys[1].before, torch.ones(4))
    primary.shard.replication.reseed = {1: {1}}
    primary.shard.send_seeds()
    ((_, seed),) = primary.forwarded
    fresh = Harness("bsp", workers=1, servers=2, rank=1, replicas=1, on_worker_failure="restart", max_restarts=1)
    ((_, reply),) = fresh.ask(seed, identity=b"server-0")
    assert reply.kind is Kind.OK
    copy = fresh.shard.keys[1]
    assert copy.before is not None and torch.equal(copy.before, torch.ones(4)) and copy.version == 1
    lying = Message(Kind.SEED, id=next(_IDS), src="server:0", keys=[{**seed.keys[0], "before": False}],
                    frames=seed.frames, body=seed.body)
    assert fresh.refused(lying) is ErrorCode.FRAME_COUNT


# -- the loop: its guard, against a fake client on an inproc socket ---------------------------------------------------
class _FakeRendezvous:
    """What the loop uses of its coordinator client."""

    def __init__(self) -> None:
        self.notices: collections.deque[dict[str, Any]] = collections.deque()
        self.shutdown_requested = threading.Event()
        self.failure: str | None = None
        self.reporter: Any = None

    def report_saved(self, *args: Any) -> None:
        raise AssertionError("no checkpoint in this test")

    def report_replicated(self, version: int | None) -> None:
        pass


def test_the_loop_answers_every_request_even_one_that_breaks_a_handler() -> None:
    ctx: zmq.Context = zmq.Context.instance()
    router, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    address = f"inproc://zps-test-loop-{next(_IDS)}"
    router.bind(address)
    client.connect(address)
    job = JobConfig(num_servers=1, num_workers=1, mode="asp", timeout=30.0)
    server = Server(Config(role="server", coordinator="127.0.0.1:1", rank=0, job=job), ctx)
    topology = Topology("server", 0, 1, 1, ("tcp://127.0.0.1:9",), "asp", 0)
    rendezvous = _FakeRendezvous()
    loop = Loop(server, router, rendezvous, topology)  # type: ignore[arg-type]
    try:
        def ask(frames: list[bytes]) -> Message:
            client.send_multipart(frames)
            assert router.poll(5000)
            loop._receive()
            assert client.poll(5000)
            return parse_frames(client.recv_multipart())

        assert ask([b"\xc1"]).body["code"] == ErrorCode.BAD_HEADER.value  # not msgpack
        assert ask(Message(Kind.REGISTER, id=5, src="worker:0").to_frames()).body["code"] == ErrorCode.BAD_KIND.value

        def broken(identity: bytes, msg: Message) -> Any:
            raise RuntimeError("a bug")

        loop.shard.handlers[Kind.STATS] = broken
        reply = ask(Message(Kind.STATS, id=6, src="worker:0").to_frames())
        assert (reply.id, reply.body["code"]) == (6, ErrorCode.INTERNAL.value) and "a bug" in reply.body["reason"]
        rendezvous.notices.append({"workers": {"0": 77}})  # the coordinator's news comes before the next request
        reply = ask(init(0, {1: torch.zeros(2)}).to_frames())
        assert reply.kind is Kind.OK and loop.shard.segments.pids == {0: 77}
        assert loop.metrics.stats()["requests"] == 4 and loop.metrics.stats()["errors"] == 3
        assert loop.metrics.report()["keys"] == 1 and rendezvous.reporter == loop.metrics.report
    finally:
        loop.close()
        client.close(linger=0)
        router.close(linger=0)
