"""Fuzzing a live server and a live coordinator with mutated real messages (:mod:`.mutate`).

After every message a probe (a valid request, on the same connection, so it is handled after the message) must be
answered: the role is alive and not blocked. A message that got no OK or VALUES reply was rejected, and must have
changed nothing: every server's parameters and versions, the coordinator's state and members. At the end the
process's RSS is within 10% of what it was after a warm-up. ``ZPS_FUZZ_SEED`` replays a run; the seed is in every
failure message.

The corpus holds an embedding table's declaration, rows pulls and pushes (zps.worker.embedding), and a JOIN, a
REPLICATE and a SEED too (this cluster refuses them: no --max-workers, no --replicas; tests/test_elastic.py and
tests/test_replication.py send bad ones to servers that take them, and :mod:`.test_fuzz_replication` fuzzes SEED,
REPLICATE and NOTICE on a replicated cluster). The cluster tier
sends 10,000 messages (5,000 shared by the two servers, 5,000 at the coordinator); the slow tier 100,000 at each
role.
"""
from __future__ import annotations

import functools
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import torch
import zmq

from zps.protocol.bodies import Commit
from zps.protocol.messages import PROTOCOL_VERSION, Kind, Message, ProtocolError, decode_header, parse_frames
from zps.protocol.peers import parse_peer
from zps.worker.client import Client
from zps.worker.embedding import EmbeddingTable

from ..helpers import LocalCluster, close_all, local_cluster, run_parallel
from . import mutate

State = list[tuple[tuple[int, ...], int, "torch.Tensor | None"]]
SERVER_KINDS = {"init", "push", "pull", "push_pull", "leave", "stats", "join", "replicate", "seed", "inspect", "put",
                "get", "table", "rows_pull", "rows_push"}
PROBE_ID = 1 << 40  # probe ids start here; a reply with this id or above is a probe's


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def seed() -> int:
    return int(os.environ.get("ZPS_FUZZ_SEED", "0")) or random.SystemRandom().randrange(1 << 32)


def workload(cluster: LocalCluster) -> list[Client]:
    """Two workers as a real job has them: worker 0 compressing (top-k, shared memory), worker 1 plain (fused
    frames); a declare, pushes, pulls, push_pulls and stats, so every kind of message is captured."""
    kwargs: list[dict[str, Any]] = [{"shm": True}, {"shm": False, "codec": "none"}]
    clients = run_parallel(lambda r: Client(cluster.worker_config(r), **kwargs[r]), range(2))
    tensors = {"w": torch.randn(64, 32), "b": torch.zeros(32), "big": torch.randn(6000)}
    run_parallel(lambda c: c.declare(tensors, ("Adam", [{"lr": 0.01}]) if c.rank == 0 else None), clients)
    outs = [{k: torch.empty_like(v) for k, v in tensors.items()} for _ in clients]
    grads = {k: torch.randn_like(v) for k, v in tensors.items()}
    def step(client: Client, number: int) -> None:
        client.push(grads, step=number).result(timeout=30)
        client.pull(outs[client.rank], step=number + 1).result(timeout=30)

    for number in range(3):
        run_parallel(functools.partial(step, number=number), clients)
    run_parallel(lambda c: c.push_pull(grads, outs[c.rank], step=3).result(timeout=30), clients)
    # a held step (hyper-parameters, a key without a gradient), its inspect and its commit; a broadcast
    held = {**grads, "b": None}

    def held_step(client: Client) -> None:
        client.push(held, step=4, hp=[{"lr": 0.005}], hold=True).result(timeout=30)  # (ASP: applied as it comes)
        with pytest.raises(ProtocolError, match="held BSP step"):  # (captured all the same)
            client.inspect(list(tensors), 4, 2.0).result(timeout=30)
        commit = Commit(step=4, skip=False, mul=[0.5], hp=[{"lr": 0.005, "betas": [0.8, 0.99]}])
        client.pull(outs[client.rank], step=5, commit=commit).result(timeout=30)
        client.broadcast({"running_mean": torch.ones(3), "count": torch.tensor(7)}, "captured")

    run_parallel(held_step, clients)

    def table_steps(client: Client) -> None:  # an embedding table's declaration, rows pulls and pushes
        table = EmbeddingTable("fuzzed", 4, optimizer="adagrad:lr=0.1", admit=2, client=client)
        for number in range(2):
            table.lookup(torch.arange(number, number + 20) * 7919).pow(2).sum().backward()
        table.synchronize()

    run_parallel(table_steps, clients)
    clients[1].stats()
    run_parallel(lambda c: c.barrier("captured"), clients)
    return clients


def server_state(cluster: LocalCluster) -> State:
    """(server, key), version and values of every key of every server; of every embedding table's partition, its
    key and home, version and stored rows (ids and values in id order)."""
    dense: State = [((i, s.key), s.version, None if s.param is None else s.param.detach().clone())
             for i, server in enumerate(cluster.servers)
             for s in sorted(server.shard.keys.values(), key=lambda s: s.key)]
    tables: State = []
    for i, server in enumerate(cluster.servers):
        for (key, home), table in sorted(server.shard.tables.parts.items()):  # (--replicas: each home's copy)
            ids, slots = table.store.index.items()
            order = torch.argsort(ids)
            held = torch.cat([ids[order].double(), table.store.values.index_select(0, slots[order]).double().flatten()])
            tables.append(((i, key, home), table.version, held))
    return dense + tables


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (a NaN a trusted peer put there equals itself: torch.equal would say it changed)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def same_state(a: State, b: State, declared_ok: bool = False) -> bool:
    """Whether the parameters of ``a`` are those of ``b`` (``declared_ok``: ``b`` may have new keys without values,
    a declaration waiting for rank 0's values)."""
    if declared_ok:
        b = [entry for entry in b if entry[2] is not None or entry[0] in {k for k, _, _ in a}]
    return len(a) == len(b) and all(
        ka == kb and va == vb and (pa is None or pb is None or same_bits(pa, pb)) and (pa is None) == (pb is None)
        for (ka, va, pa), (kb, vb, pb) in zip(a, b, strict=True))


def coordinator_state(cluster: LocalCluster) -> tuple[Any, ...]:
    c = cluster.coordinator
    return (c.state, c.error, sorted((k, m.done, m.failed) for k, m in c.members.items()))


def tame(frames: list[bytes], members: set[tuple[str, int]]) -> list[bytes]:
    """A mutated DONE that a member could really send ends the job (a worker's clean end, or its failure): that is
    the coordinator working, not failing, so such a message speaks for nobody instead."""
    if not frames or b"done" not in frames[0]:
        return frames
    try:
        head = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    except Exception:
        return frames
    if isinstance(head, dict) and head.get("kind") == "done" and parse_peer(head.get("src")) in members:
        head["src"] = "worker:99"
        try:
            return [msgpack.packb(head, use_bin_type=True), *frames[1:]]
        except (OverflowError, ValueError, TypeError):
            return [b"\x00"]
    return frames


def request_id(frames: list[bytes]) -> int:
    """The id a role answers ``frames`` with: its header's, when the roles can read it and it has an integer one
    (else 0)."""
    try:
        head = decode_header(frames[0])
    except ProtocolError:
        return 0
    found = head.get("id") if isinstance(head, dict) else None
    return found if type(found) is int and 0 <= found < 1 << 64 else 0


def probe(kind: str, number: int, src: str, body: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, "id": PROBE_ID + number, "src": src, "body": body})


def run_fuzz(sock: zmq.Socket, mutator: mutate.Mutator, count: int, make_probe: Callable[[int], bytes],
             state: Callable[[], Any], same: Callable[..., bool], alive: Callable[[], bool], where: str,
             adjust: Callable[[list[bytes]], list[bytes]] = lambda f: f,
             deliver: Callable[[list[bytes]], None] | None = None) -> dict[str, int]:
    """Send ``count`` mutated messages, each followed by a probe; check the invariants (module docstring).
    ``deliver``: how a message reaches the role when not over ``sock`` (the probe always goes over ``sock``)."""
    tally = {"rejected": 0, "accepted": 0, "unanswered": 0}
    warm_rss = 0
    warm_up = min(500, count // 10)
    for i in range(count):
        if i == warm_up:
            warm_rss = rss()
        frames = adjust(mutator.next())
        before = state()
        (deliver or sock.send_multipart)(frames)
        sock.send_multipart([make_probe(i)])
        mine = {0, request_id(frames)}  # the message's replies: its id, or 0 when its header could not be read
        answers: list[Message] = []
        deadline = time.monotonic() + 30
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and sock.poll(int(left * 1000) + 1), (
                f"{where}: no answer to the probe after message {i} {frames[:2]!r:.300}")
            reply = parse_frames(sock.recv_multipart(copy=False))
            if reply.id == PROBE_ID + i:
                break
            if reply.id in mine:  # (a mutated id may be anything, a probe's range too)
                answers.append(reply)
        accepted = any(m.kind in (Kind.OK, Kind.VALUES) for m in answers)
        outcome = "accepted" if accepted else "rejected" if answers else "unanswered"
        tally[outcome] += 1
        # a rejected message changed nothing; one that waits (a declaration, a pull) changed no parameter
        if outcome == "rejected":
            assert same(before, state()), f"{where}: rejected message {i} changed state: {frames[:2]!r:.300}"
        elif outcome == "unanswered":
            assert same(before, state(), declared_ok=True), (
                f"{where}: waiting message {i} changed parameters: {frames[:2]!r:.600}")
    assert alive(), f"{where}: a role's thread ended"
    grown = rss() - warm_rss
    assert grown <= 0.10 * warm_rss, f"{where}: RSS grew by {grown >> 20} MiB of {warm_rss >> 20} MiB"
    return tally


def fuzz(count: int, coordinator_count: int | None = None) -> None:
    """``count`` messages shared by the servers and ``coordinator_count`` (default ``count``) at the coordinator."""
    run_seed = seed()
    where = f"ZPS_FUZZ_SEED={run_seed}"
    with mutate.capturing() as captured, local_cluster(2, 2, "asp", codec="topk:ratio=0.25", compress_min=16,
                                                       max_pending=32) as cluster:
        clients = workload(cluster)
        try:
            seeds_by_role: dict[str, list[list[bytes]]] = {"server": [], "coordinator": []}
            for frames in list(captured):
                kind = msgpack.unpackb(frames[0], raw=False).get("kind")
                seeds_by_role["server" if kind in SERVER_KINDS else "coordinator"].append(frames)
            seeds_by_role["server"].append([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "leave", "id": 7,
                                                           "src": "worker:1"})])
            # a worker beyond --workers asking to be counted (--max-workers), and a primary's forwarded update
            seeds_by_role["server"].append([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "join", "id": 9,
                                                           "src": "worker:2", "body": {"step": 3}})])
            seeds_by_role["server"].append([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "replicate", "id": 10,
                                                           "src": "server:1", "keys": [
                                                               {"key": 0, "version": 1, "lr": 0.1, "step": 1,
                                                                "worker": 0, "nf": 1, "codec": "none",
                                                                "bufs": [["float32", 16]]}]}), bytes(64)])
            seeds_by_role["server"].append([msgpack.packb({  # ... and a primary's whole state of a key
                "v": PROTOCOL_VERSION, "kind": "seed", "id": 11, "src": "server:1",
                "body": {"optimizer": "Adam", "groups": [{"lr": 0.1}], "failover": {"version": 1, "dead": [0]}},
                "keys": [{"key": 0, "name": "w", "offset": 0, "numel": 16, "group": 0, "home": 0, "version": 2,
                          "lr": 0.1, "nf": 2, "codec": "none", "bufs": [["float32", 16]], "last": [[0, 1]],
                          "ostate": [["exp_avg", "float32", [16]]]}]}), bytes(64), bytes(64)])
            for kind, src, body in (("done", "worker:1", {"exit_code": 1, "failure": "x"}),
                                    ("saved", "server:0", {"checkpoint": 1, "file": "part.safetensors", "size": 8,
                                                           "info": {}}),  # what a job sends only at its end
                                    # ... and a member rejoining a coordinator that restarted
                                    ("register", "server:0", {"role": "server", "rank": 0, "host": socket.gethostname(),
                                                              "pid": os.getpid(), "rejoin": True,
                                                              "address": clients[0].topology.servers[0]})):
                seeds_by_role["coordinator"].append([msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, "id": 8,
                                                                    "src": src, "body": body})])
            kinds = {msgpack.unpackb(f[0], raw=False)["kind"] for fs in seeds_by_role.values() for f in fs}
            assert SERVER_KINDS | {"register", "heartbeat", "barrier", "done"} <= kinds, kinds
            alive = lambda: all(t.is_alive() for t in cluster.threads)  # noqa: E731
            rng = random.Random(run_seed)
            for address in clients[0].topology.servers:
                sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(address)
                try:
                    tally = run_fuzz(sock, mutate.Mutator(seeds_by_role["server"], rng), count // 2,
                                     lambda i: probe("stats", i, "worker:0", {}), lambda: server_state(cluster),
                                     same_state, alive, f"server at {address}, {where}")
                finally:
                    sock.close()
                assert tally["rejected"] > count // 4, tally  # the mutations reach the handlers' refusals
            members = set(cluster.coordinator.members)
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cluster.coordinator.address)
            try:
                tally = run_fuzz(sock, mutate.Mutator(seeds_by_role["coordinator"], rng), coordinator_count or count,
                                 lambda i: probe("register", i, "probe", {"role": "probe"}),
                                 lambda: coordinator_state(cluster), lambda a, b, **_: a == b, alive,
                                 f"coordinator, {where}", adjust=lambda f: tame(f, members))
            finally:
                sock.close()
            assert tally["rejected"] > (coordinator_count or count) // 2, tally
            assert cluster.coordinator.state.value == "running" and alive()
        finally:
            close_all(clients)


@pytest.mark.cluster
def test_ten_thousand_hostile_messages_end_nothing_and_change_nothing() -> None:
    fuzz(5_000, 5_000)  # the servers share 5,000, the coordinator gets 5,000


@pytest.mark.slow
@pytest.mark.timeout(1500)  # 200,000 messages take about 10 minutes on 2 cores
def test_a_hundred_thousand_hostile_messages_at_each_role() -> None:
    fuzz(200_000, 100_000)  # 100,000 at each server and at the coordinator
