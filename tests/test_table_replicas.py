"""Embedding tables under --replicas R: each home's partition lives on its primary and R backups, bit for bit; a
forged or misrouted forward or seed changes nothing; a backup new to a home is seeded whole in bounded parts; and
real jobs survive a server killed mid-run with the rows of a run nobody killed (BSP) or every push applied exactly
once (ASP)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import zmq
from safetensors.torch import load_file

from zps.protocol import replicas, transport
from zps.protocol import tables as wire
from zps.protocol.messages import PROTOCOL_VERSION, ErrorCode, Kind, Message, parse_frames
from zps.ps._tables import Table
from zps.worker import DistributedOptimizer, EmbeddingTable
from zps.worker.client import Client

from .helpers import (
    ROOT,
    LocalCluster,
    close_all,
    kill_tagged,
    local_cluster,
    run_parallel,
)
from .test_replication import run_counting_through_kills, run_job

IDS = torch.arange(400, dtype=torch.int64) * 7919 - 5


def _train(client: Client, rank: int, steps: int, **table: Any) -> None:
    """A table (and a dense head) trained by one worker: each step's ids and targets depend on (step, rank) only."""
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 1)
    emb = EmbeddingTable("emb", 6, mode="sum", client=client, **table)
    opt = DistributedOptimizer(torch.optim.SGD(head.parameters(), lr=0.1), head, client=client)
    for step in range(steps):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = IDS[torch.randint(0, IDS.numel(), (8, 3), generator=g)]
        opt.zero_grad()
        torch.nn.functional.mse_loss(head(emb(ids)), torch.randn(8, 1, generator=g)).backward()
        opt.step()
    emb.synchronize()
    opt.synchronize()


def _state(table: Table) -> dict[str, Any]:
    """Everything a partition computes with: its rows (values, optimizer state, last updates, admission sketch),
    step counts and push record."""
    tensors, meta = table.store.export()
    return {"tensors": tensors, "steps": meta["steps"], "clock": meta["clock"], "version": table.version,
            "last_step": dict(table.last_step)}


def _assert_same(primary: dict[str, Any], backup: dict[str, Any], what: str) -> None:
    assert primary["tensors"].keys() == backup["tensors"].keys(), what
    for name, tensor in primary["tensors"].items():
        assert torch.equal(tensor, backup["tensors"][name]), f"{what}: {name} differs"
    assert {k: v for k, v in primary.items() if k != "tensors"} == {k: v for k, v in backup.items() if k != "tensors"}


def _partitions(cluster: LocalCluster, key: int) -> dict[int, list[tuple[int, Table]]]:
    """Home -> [(server, its partition of that home)], primary first."""
    out: dict[int, list[tuple[int, Table]]] = {}
    for home in range(len(cluster.servers)):
        for server in replicas.copies(home, 1, len(cluster.servers)):
            out.setdefault(home, []).append((server, cluster.servers[server].shard.tables.parts[(key, home)]))
    return out


# -- in process --------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("mode, table", [
    ("bsp", {"optimizer": "adam:lr=0.05", "admit": 2, "expire": 3}),
    ("asp", {"optimizer": "rowwise_adagrad:lr=0.1"}),
    ("bsp", {"optimizer": "adagrad:lr=0.1", "sync": "async"}),  # the hybrid: an ASP table in a BSP job
    ("ssp", {"optimizer": "sgd:lr=0.1", "expire": 2}),
])
def test_each_backup_partition_equals_its_primarys_bit_for_bit(mode: str, table: dict[str, Any]) -> None:
    """3 servers, 2 workers, --replicas 1: after training, each home's partition on its backup equals the primary's
    (values, optimizer state, last updates, admission sketch, step counts, push record), and each server counts
    the rows it holds as a backup."""
    with local_cluster(3, 2, mode, staleness=1 if mode == "ssp" else 0, replicas=1) as cluster:
        clients = cluster.clients()
        try:
            run_parallel(lambda r: _train(clients[r], r, 12, **table), range(2))
            stats = clients[0].stats()
        finally:
            close_all(clients)
        key = wire.table_key("emb")
        for home, copies in _partitions(cluster, key).items():
            (_, primary), (backup_rank, backup) = copies
            assert len(primary.store) > 20 and primary.version == (12 if mode == "bsp" and "sync" not in table
                                                                   else 24), home
            _assert_same(_state(primary), _state(backup), f"rows of server {home} on server {backup_rank}")
        assert all(s["tables"]["emb"]["backup_rows"] > 0 for s in stats)


def _raw(address: str) -> zmq.Socket:
    raw: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(address)
    return raw


def _ask(raw: zmq.Socket, msg: Message) -> Message:
    transport.send(raw, msg)
    assert raw.poll(10_000), f"no answer to {msg.describe()}"
    return transport.recv(raw)


@pytest.mark.unit
def test_a_forged_misrouted_or_malformed_table_forward_is_refused_and_changes_nothing() -> None:
    """A backup takes a table forward only from the primary of that home (a server that is not: CONFLICT, as for
    dense keys), of a partition it holds, with ids of that home and frames of their sizes, never one that skips
    updates; each refusal changes nothing."""
    with local_cluster(3, 1, "bsp", replicas=1) as cluster:
        (client,) = cluster.clients()
        try:
            _train(client, 0, 3)
            key = wire.table_key("emb")
            home = 0
            backup = cluster.servers[1].shard.tables.parts[(key, home)]
            before = _state(backup)
            ids = IDS[wire.server_of(IDS, 3) == home][:4]
            other = IDS[wire.server_of(IDS, 3) == 2][:4]
            grads = torch.ones(4, 6)
            entry = {"key": key, "home": home, "version": backup.version, "step": backup.version, "numel": 4, "nf": 2}
            good = [wire.ids_frame(ids), grads.numpy().tobytes()]
            cases: list[tuple[str, dict[str, Any], list[Any], ErrorCode]] = [
                ("worker:0", entry, good, ErrorCode.BAD_HEADER),  # only a server forwards
                ("server:2", entry, good, ErrorCode.CONFLICT),  # not the primary of home 0
                ("server:0", {**entry, "home": 2}, good, ErrorCode.CONFLICT),  # server 1 holds no copy of home 2
                ("server:0", {**entry, "key": key + 1}, good, ErrorCode.UNKNOWN_KEY),
                ("server:0", {**entry, "version": backup.version + 1}, good, ErrorCode.CONFLICT),  # skips one
                ("server:0", {**entry, "worker": 0}, good, ErrorCode.BAD_HEADER),  # a BSP update names no worker
                ("server:0", {**entry, "hp": {"lr": -1.0}}, good, ErrorCode.BAD_OPTIMIZER),
                ("server:0", entry, [wire.ids_frame(other), good[1]], ErrorCode.CONFLICT),  # another home's rows
                ("server:0", entry, [good[0], good[1][:-4]], ErrorCode.FRAME_SIZE),
                ("server:0", {**entry, "nf": 3, "sightings": True}, [*good, torch.full((4,), 9).numpy().tobytes()],
                 ErrorCode.BAD_HEADER),  # sightings above the workers
                ("server:0", {**entry, "numel": 1 << 40}, good, ErrorCode.TOO_LARGE),
            ]
            raw = _raw(client.topology.servers[1])
            try:
                for i, (src, fields, frames, code) in enumerate(cases):
                    header = {"v": PROTOCOL_VERSION, "kind": Kind.TABLE_REPLICATE.value, "id": i + 1, "src": src,
                              "keys": [fields]}
                    raw.send_multipart([msgpack.packb(header), *frames])
                    assert raw.poll(10_000), f"case {i}: no answer"
                    reply = parse_frames(raw.recv_multipart())
                    assert reply.kind is Kind.ERROR and reply.body["code"] == code.value, (i, reply.body)
                _assert_same(before, _state(backup), "after the refusals")
                # the primary's own forward, sent again (late or repeated), is acknowledged and applied once
                primary = cluster.servers[0].shard.tables.parts[(key, home)]
                late = {**entry, "version": backup.version - 1, "step": backup.version - 1}
                assert _ask(raw, Message(Kind.TABLE_REPLICATE, id=50, src="server:0", keys=[late],  # type: ignore[list-item]
                                         frames=good)).kind is Kind.OK
                _assert_same(_state(primary), _state(backup), "after a repeated forward")
            finally:
                raw.close()
        finally:
            client.close()


@pytest.mark.unit
def test_a_push_retried_to_the_backup_after_it_was_applied_is_acknowledged_and_not_applied_again() -> None:
    """ASP: the push record travels with the forwards, so a worker's push sent again to the home's backup (as after
    a failover) is answered OK and not applied twice; the next push is applied on both copies alike."""
    with local_cluster(2, 1, "asp", replicas=1) as cluster:
        (client,) = cluster.clients()
        try:
            _train(client, 0, 3)
            key, home = wire.table_key("emb"), 0
            primary = cluster.servers[0].shard.tables.parts[(key, home)]
            backup = cluster.servers[1].shard.tables.parts[(key, home)]
            assert primary.last_step == backup.last_step == {0: 2}
            before = _state(backup)
            ids = IDS[wire.server_of(IDS, 2) == home][:5]
            frames, _ = wire.encode_rows(torch.ones(5, 6), "none")

            def push(step: int) -> Message:
                entry = wire.row_entry(key, step, 5, nf=2, codec="none", home=home)
                return Message(Kind.ROWS_PUSH, id=step, src="worker:0", keys=[entry],
                               frames=[wire.ids_frame(ids), *frames])

            raw = _raw(client.topology.servers[1])
            try:
                assert _ask(raw, push(2)).kind is Kind.OK  # step 2 again, to the backup
                _assert_same(before, _state(backup), "after the retry")
                assert backup.counters["duplicate_pushes"] == 1
            finally:
                raw.close()
            raw = _raw(client.topology.servers[0])
            try:
                assert _ask(raw, push(3)).kind is Kind.OK  # answered once the backup holds it
                assert primary.version == backup.version == before["version"] + 1
                _assert_same(_state(primary), _state(backup), "after the next push")
            finally:
                raw.close()
        finally:
            client.close()


@pytest.mark.unit
def test_a_server_without_replicas_refuses_table_forwards_and_seeds() -> None:
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients()
        raw = _raw(client.topology.servers[0])
        try:
            for kind in (Kind.TABLE_REPLICATE, Kind.TABLE_SEED):
                reply = _ask(raw, Message(kind, id=1, src="server:0", keys=[{"key": 1, "nf": 0}]))
                assert reply.kind is Kind.ERROR and reply.body["code"] == ErrorCode.BAD_KIND.value, reply.body
        finally:
            raw.close()
            client.close()


@pytest.mark.unit
def test_a_backup_new_to_a_home_is_seeded_whole_in_bounded_parts_checked_before_anything_changes() -> None:
    """Re-replication's messages for a partition: under a 64 KiB message cap the partition (rows, Adam state, last
    updates, admission sketch, step counts) travels in many parts, none over the cap; a server the coordinator's
    notice made a copy of that home takes it once the last part came, bit for bit; a part out of order, of another
    seed or malformed is refused and changes nothing; a seed from a server that is not the home's primary is
    refused at its last part."""
    with local_cluster(3, 1, "asp", replicas=1, max_message_bytes=1 << 16) as cluster:
        (client,) = cluster.clients()
        try:
            _train(client, 0, 6, optimizer="adam:lr=0.05", admit=2)
            key, home = wire.table_key("emb"), 0
            primary = cluster.servers[0].shard
            stranger = cluster.servers[2]
            assert (key, home) not in stranger.shard.tables.parts
            loop = stranger._loop
            assert loop is not None
            loop.rendezvous.notices.append(replicas.notice_body(1, {1}))  # server 1 (home 0's backup) failed over
            end = time.monotonic() + 30
            while stranger.shard.replication.version != 1:
                assert time.monotonic() < end, "the stranger never took the notice"
                time.sleep(0.01)  # (the server's thread takes the notice at its next loop)
            table = primary.tables.parts[(key, home)]
            parts = primary.table_replicas.seed_messages(table)
            for msg in parts:
                msg.body["failover"] = {"version": 1, "dead": [1]}
            assert len(parts) > 10 and all(transport.size_of(m.to_frames()) < 1 << 16 for m in parts)
            assert sum(m.keys[0]["numel"] for m in parts) == len(table.store) > 0
            raw = _raw(client.topology.servers[2])
            try:
                def refused(msg: Message, code: ErrorCode) -> None:
                    reply = _ask(raw, msg)
                    assert reply.kind is Kind.ERROR and reply.body["code"] == code.value, reply.body
                    assert (key, home) not in stranger.shard.tables.parts

                first, second = parts[0], parts[1]
                refused(Message(Kind.TABLE_SEED, id=1, src="server:0", keys=second.keys, body=second.body,
                                frames=second.frames), ErrorCode.CONFLICT)  # no part 0 before it
                refused(Message(Kind.TABLE_SEED, id=2, src="server:0", keys=first.keys,
                                body={**first.body, "rows": 1 << 62}, frames=first.frames), ErrorCode.BAD_HEADER)
                refused(Message(Kind.TABLE_SEED, id=3, src="server:0", keys=first.keys, body=first.body,
                                frames=[first.frames[0], bytes(first.frames[1])[:-4], *first.frames[2:]]),
                        ErrorCode.FRAME_SIZE)
                refused(Message(Kind.TABLE_SEED, id=4, src="server:0", keys=first.keys,
                                body={**first.body, "table": {**first.body["table"], "dim": 7}}, frames=first.frames),
                        ErrorCode.CONFLICT)  # the table is declared otherwise here
                # a seed sent by a server that is not the primary of home 0: refused at its last part
                for msg in parts[:-1]:
                    assert _ask(raw, Message(Kind.TABLE_SEED, id=10, src="server:2", keys=msg.keys, body=msg.body,
                                             frames=msg.frames)).kind is Kind.OK
                refused(Message(Kind.TABLE_SEED, id=11, src="server:2", keys=parts[-1].keys, body=parts[-1].body,
                                frames=parts[-1].frames), ErrorCode.CONFLICT)
                for msg in parts:
                    assert _ask(raw, msg).kind is Kind.OK
                copy = stranger.shard.tables.parts[(key, home)]
                _assert_same(_state(table), _state(copy), "the seeded copy")
                assert copy.store.sketch is not None and table.store.sketch is not None
                assert torch.equal(copy.store.sketch, table.store.sketch) and bool(table.store.sketch.any())
            finally:
                raw.close()
        finally:
            client.close()


# -- real processes, a server killed mid-run -----------------------------------------------------------------------
TABLE_SCRIPT = str(ROOT / "tests" / "scripts" / "table_steps.py")
COUNT_ROWS = str(ROOT / "tests" / "scripts" / "count_rows.py")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The rows and dense head after 30 BSP steps of tests/scripts/table_steps.py that nobody interrupted."""
    out = tmp_path_factory.mktemp("table-replicas") / "final.st"
    tag = f"table-replicas-straight-{os.getpid()}"
    try:
        run_job(tag, ["--servers", "3", "--workers", "2", "--mode", "bsp", TABLE_SCRIPT, "--steps", "30", "--out",
                   str(out)])
    finally:
        kill_tagged(tag)
    return load_file(str(out))


@pytest.mark.cluster
@pytest.mark.parametrize("kills", ["server:1@15", "server:0@10,server:1@20"])
def test_bsp_table_and_dense_survive_a_killed_server_with_the_uninterrupted_bits(
        straight: dict[str, torch.Tensor], tag: str, tmp_path: Path, kills: str) -> None:
    """--replicas 1, 3 servers, 2 workers, BSP, a table (Adam) and a dense head: server 1 is killed (SIGKILL) at
    step 15 (or server 0 at step 10, then server 1 at 20, after the first death's re-replication: every row ends on
    server 2 alone); the dead servers' rows are served by their backups, which seed the next live servers, and the
    job ends with every row and parameter of the run nobody killed, bit for bit."""
    out = tmp_path / "final.st"
    text = run_job(tag, ["--servers", "3", "--workers", "2", "--mode", "bsp", "--replicas", "1", "--kill", kills,
                      TABLE_SCRIPT, "--steps", "30", "--out", str(out)])
    for kill in kills.split(","):
        victim = kill.split(":")[1].split("@")[0]
        assert f"server {victim} was killed by SIGKILL: its backups take over" in text, text
    assert re.search(r"FAILOVER: server:\d: seeding server \d with \d+ table partitions", text), text
    got = load_file(str(out))
    assert got.keys() == straight.keys()
    for name in straight:
        assert torch.equal(got[name], straight[name]), (name, (got[name] - straight[name]).abs().max())


@pytest.mark.cluster
@pytest.mark.parametrize("count, kills", [(1, "server:1@15"), (2, "server:0@10,server:1@25")])
def test_asp_applies_every_pushed_row_exactly_once_through_a_killed_server(tag: str, tmp_path: Path, count: int,
                                                                           kills: str) -> None:
    """ASP, --replicas 1 (one server killed) or 2 (two, one after the other): every row and dense element ends
    with exactly the sum of every worker's pushes (each applied once, retries through the failover included)."""
    text = run_counting_through_kills(tag, COUNT_ROWS, count, kills, 40, tmp_path / "final.st")
    print(re.findall(r"DUPLICATES \d+", text))
