"""Fuzzing what a replicated job adds (issues 22, 23): SEED, REPLICATE, TABLE_SEED and TABLE_REPLICATE at its
servers, the coordinator's NOTICE
messages (sent to a server's port by a peer, and heard on the heartbeat channel, where only the coordinator speaks,
failover notices included), and the ``--net`` relay's ports.

Messages: the invariants of :mod:`.test_fuzz` (after every message a probe on the same connection is answered; a
refused message changed nothing; one left waiting changed no parameter; RSS within 10% of the warm-up's), on a
3-server ``--replicas 1`` cluster, with real REPLICATE and TABLE_REPLICATE messages (captured from the primaries'
forwards), real SEEDs and TABLE_SEEDs (:func:`zps.ps._seeds.seed_messages` of a primary's state,
:meth:`zps.ps._table_replicas.TableReplicas.seed_messages` of its table partitions) and notices as the corpus. A
notice on the heartbeat channel gets no answer: it may change no parameter or version, and the server goes on
serving. A notice that would really fail a server over or end a worker (the coordinator doing its job) is made
stale instead, as :func:`.test_fuzz.tame` does with a member's DONE. At the end a worker's own push and pull get
the right values.

The relay: hostile connections (random bytes, a ZMTP greeting and then a frame claiming 2^40 bytes, half-open and
reset connections, a flood past the relay's window) to the port a worker reaches a server through; the relay goes
on relaying the worker's connection (the right values after every batch), takes a new connection once the hostile
ones closed, and the process that hosts it (the launcher; here the test) does not grow.

The cluster tier sends 450 replication messages, 150 notices and 24 hostile connections (a few seconds); the slow
tier 60,000, 30,000 and 600. ``ZPS_FUZZ_SEED`` replays a run.
"""
from __future__ import annotations

import contextlib
import functools
import random
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import msgpack
import pytest
import torch
import zmq

from zps.protocol import replicas
from zps.protocol.bodies import SeedBody
from zps.protocol.messages import PROTOCOL_VERSION, Kind, ProtocolError, parse_frames
from zps.ps._seeds import seed_messages
from zps.worker import EmbeddingTable
from zps.worker.client import Client

from ..helpers import LocalCluster, close_all, local_cluster, run_parallel
from . import mutate
from .test_fuzz import PROBE_ID, probe, rss, run_fuzz, same_state, seed, server_state

Frames = list[bytes]
TENSORS = {"w": (64, 32), "b": (32,), "big": (6000,)}


def _train(cluster: LocalCluster) -> tuple[list[Client], dict[str, torch.Tensor]]:
    """Two plain workers: Adam declared, three steps of push_pull (the primaries forward each to their backup)."""
    clients = cluster.clients(shm=False)
    torch.manual_seed(0)
    tensors = {name: torch.randn(shape) for name, shape in TENSORS.items()}
    run_parallel(lambda c: c.declare(tensors, ("Adam", [{"lr": 0.01}]) if c.rank == 0 else None), clients)
    outs = [{k: torch.empty_like(v) for k, v in tensors.items()} for _ in clients]
    grads = {k: torch.randn_like(v) for k, v in tensors.items()}

    def step(client: Client, number: int) -> None:
        client.push_pull(grads, outs[client.rank], step=number).result(timeout=30)

    for number in range(3):
        run_parallel(functools.partial(step, number=number), clients)

    def table_steps(client: Client) -> None:  # an embedding table's pushes (forwarded to the backups too)
        table = EmbeddingTable("fuzzed", 4, optimizer="adagrad:lr=0.1", client=client)
        for number in range(2):
            table.lookup(torch.arange(number, number + 20) * 7919).pow(2).sum().backward()
        table.synchronize()

    run_parallel(table_steps, clients)
    return clients, grads


def _notice(body: dict[str, Any]) -> Frames:
    return [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "notice", "id": 0, "src": "coordinator", "body": body})]


def _corpus(cluster: LocalCluster, captured: list[Frames]) -> list[Frames]:
    """The captured REPLICATEs, SEEDs of each primary's keys (in the topology as it is, and as the first seed after
    a failover would be), and NOTICEs of each kind."""
    corpus = [f for f in captured if msgpack.unpackb(f[0], raw=False).get("kind") in ("replicate", "table_replicate")]
    assert corpus, "no REPLICATE was captured"
    ids = iter(range(20, 1 << 20))
    for server in cluster.servers:
        rank = server.shard.replication.rank
        states = [s for s in server.shard.keys.values() if s.home == rank]
        for failover in ({"version": 0, "dead": []}, {"version": 1, "dead": [(rank + 2) % 3]}):
            body = cast(SeedBody, {"optimizer": "Adam", "groups": [{"lr": 0.01}], "failover": failover})
            for msg, _ in seed_messages(states, server.shard.keys.optimizer_state, body, f"server:{rank}", ids,
                                        1 << 20):
                corpus.append([bytes(f) for f in msg.to_frames()])
            for table in server.shard.tables:
                if table.home == rank:
                    for part in server.shard.table_replicas.seed_messages(table):
                        part.body["failover"] = failover
                        corpus.append([bytes(f) for f in part.to_frames()])
    notices: list[dict[str, Any]] = [replicas.notice_body(1, {2}), {"gone": 1, "why": "killed"}, {"replaced": 0},
                                     {"workers": {"0": 4242, "1": 4243}}]
    corpus += [_notice(notice) for notice in notices]
    kinds = {msgpack.unpackb(f[0], raw=False)["kind"] for f in corpus}
    assert kinds == {"replicate", "seed", "table_replicate", "table_seed", "notice"}, kinds
    return corpus


def _tame_notice(body: Any, current: int) -> Any:
    """What the coordinator could really say is made harmless: a failover notice it could send becomes one already
    seen, a worker it could end becomes one the job never had."""
    if not isinstance(body, dict):
        return body
    with contextlib.suppress(ValueError):
        if replicas.parse_notice(body, 3) is not None:
            body = {**body, "failover": {**body["failover"], "version": current}}
    for name in ("gone", "replaced"):
        if type(body.get(name)) is int and 0 <= body[name] < 2:
            body = {**body, name: 1 << 20}
    return body


@contextlib.contextmanager
def _dealer(address: str) -> Iterator[zmq.Socket]:
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        yield sock
    finally:
        sock.close()


def _right_values(clients: list[Client], grads: dict[str, torch.Tensor]) -> None:
    """A worker's own next push is applied, and both workers pull the same values."""
    outs = [{k: torch.empty_like(v) for k, v in grads.items()} for _ in clients]
    before = {k: torch.empty_like(v) for k, v in grads.items()}
    clients[0].pull(before, step=0).result(timeout=30)
    clients[0].push(grads, step=3).result(timeout=30)
    run_parallel(lambda c: c.pull(outs[c.rank], step=0).result(timeout=30), clients)
    for name in grads:
        assert torch.equal(outs[0][name], outs[1][name]), name
        assert not torch.equal(outs[0][name], before[name]), f"{name}: the push changed nothing"


def fuzz_replication(count: int, notice_count: int) -> None:
    started = time.monotonic()
    run_seed = seed()
    where = f"ZPS_FUZZ_SEED={run_seed}"
    with mutate.capturing() as captured, local_cluster(3, 2, "asp", replicas=1, max_pending=32) as cluster:
        clients, grads = _train(cluster)
        try:
            corpus = _corpus(cluster, list(captured))
            rng = random.Random(run_seed)
            alive = lambda: all(t.is_alive() for t in cluster.threads)  # noqa: E731
            state = lambda: server_state(cluster)  # noqa: E731
            addresses = clients[0].topology.servers
            # at each server's port: forged and mangled SEED, REPLICATE and NOTICE messages
            accepted = 0
            for address in addresses:
                with _dealer(address) as sock:
                    tally = run_fuzz(sock, mutate.Mutator(corpus, rng), count // 3,
                                     lambda i: probe("stats", i, "worker:0", {}), state, same_state, alive,
                                     f"server at {address}, {where}")
                print(f"server at {address}: {tally}")
                assert tally["rejected"] > count // 12, tally
                accepted += tally["accepted"]
            assert accepted, "no mutated SEED or REPLICATE was taken: the corpus reaches no handler's end"
            # on the heartbeat channel: mangled notices, as the coordinator's would reach a server's loop
            notices = [f for f in corpus if b"notice" in f[0]]
            for index, server in enumerate(cluster.servers):
                loop = server._loop
                assert loop is not None
                heard = loop.rendezvous

                def hear(frames: Frames, heard: Any = heard, server: Any = server) -> None:
                    try:  # what the heartbeat thread does with a message from the coordinator
                        msg = parse_frames(frames)
                    except ProtocolError:
                        return
                    if msg.kind is Kind.NOTICE:
                        heard.notices.append(_tame_notice(msg.body, server.shard.replication.version))

                with _dealer(addresses[index]) as sock:
                    # a notice seen already that names this server dead: stale, it fences nothing (it once did)
                    hear(_notice(replicas.notice_body(0, {index})))
                    sock.send_multipart([probe("stats", 0, "worker:0", {})])
                    assert sock.poll(10_000) and parse_frames(sock.recv_multipart()).id == PROBE_ID
                    assert server.shard.replication.fenced is None, server.shard.replication.fenced
                    tally = run_fuzz(sock, mutate.Mutator(notices, rng), notice_count // 3,
                                     lambda i: probe("stats", i, "worker:0", {}), state, same_state, alive,
                                     f"notices to server {index}, {where}", deliver=hear)
                assert tally["unanswered"] == notice_count // 3, tally
                assert server.shard.replication.fenced is None and server.shard.replication.dead == frozenset()
            assert alive() and cluster.coordinator.error is None
            _right_values(clients, grads)
            print(f"{count} replication messages and {notice_count} notices in {time.monotonic() - started:.1f}s")
        finally:
            close_all(clients)


@pytest.mark.cluster
def test_mangled_seeds_replicates_and_notices_end_nothing_and_change_nothing() -> None:
    fuzz_replication(450, 150)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sixty_thousand_mangled_seeds_replicates_and_thirty_thousand_notices() -> None:
    fuzz_replication(60_000, 30_000)  # about a minute on 2 cores


# -- the --net relay ---------------------------------------------------------------------------------------------
GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
READY = b"\x04" + bytes([26]) + b"\x05READY\x0bSocket-Type" + (6).to_bytes(4, "big") + b"DEALER"


def _hostile(rng: random.Random, host: str, port: int) -> socket.socket:
    """One hostile connection to a relay port; returned open (half-open ones stay so) for the caller to close."""
    conn = socket.create_connection((host, port), timeout=10)
    kind = rng.choice(("garbage", "oversized", "half-open", "idle", "reset", "flood"))
    with contextlib.suppress(OSError):  # the far side may close first: what was sent is sent
        if kind == "garbage":
            conn.sendall(rng.randbytes(rng.randint(1, 1 << 16)))
        elif kind == "oversized":  # a valid handshake, then a frame that claims 1 TiB and starts sending it
            conn.sendall(GREETING + READY + b"\x02" + (1 << 40).to_bytes(8, "big") + rng.randbytes(1 << 16))
        elif kind == "half-open":  # part of a greeting, then nothing more from this side
            conn.sendall(GREETING[: rng.randint(1, len(GREETING) - 1)])
            conn.shutdown(socket.SHUT_WR)
        elif kind == "reset":
            conn.sendall(GREETING + rng.randbytes(rng.randint(0, 512)))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        elif kind == "flood":  # far more than one window, as fast as it is taken
            conn.settimeout(2)
            chunk = rng.randbytes(1 << 16)
            for _ in range(64):
                conn.sendall(chunk)
    return conn


def _relayed(host: str, port: int, within: float = 30.0) -> None:
    """A new connection to the relay port is relayed to the server: a raw request through it is answered."""
    deadline = time.monotonic() + within
    number = 0
    while True:
        with _dealer(f"tcp://{host}:{port}") as sock:
            number += 1
            sock.send_multipart([probe("stats", number, "worker:0", {})])
            if sock.poll(2000):
                assert parse_frames(sock.recv_multipart()).id == PROBE_ID + number
                return
        assert time.monotonic() < deadline, f"the relay at {host}:{port} relays no new connection within {within}s"


def fuzz_relay(connections: int) -> None:
    from zps.lab.network import MAX_CONNECTIONS

    run_seed = seed()
    rng = random.Random(run_seed)
    with local_cluster(1, 1, "asp", net="bw=1gbit") as cluster:
        (client,) = cluster.clients(shm=False)
        try:
            w = torch.zeros(64)
            client.declare({"w": w}, ("SGD", [{"lr": 1.0}]))
            host, port = client.topology.servers[0].removeprefix("tcp://").rsplit(":", 1)
            threads = threading.active_count()
            warm_rss = 0
            step = 0
            batch = MAX_CONNECTIONS - 1  # the worker's own connection is one of the relay's
            for first in range(0, connections, batch):
                if first == batch * 2:
                    warm_rss = rss()
                open_ = [_hostile(rng, host, int(port)) for _ in range(min(batch, connections - first))]
                # the worker's own connection is relayed meanwhile: its push is applied, its pull has it
                client.push_pull({"w": torch.ones(64)}, {"w": w}, step).result(timeout=30)
                step += 1
                assert torch.equal(w, torch.full((64,), -float(step))), (f"ZPS_FUZZ_SEED={run_seed}", w)
                for conn in open_:
                    conn.close()
            _relayed(host, int(port))
            assert threading.active_count() - threads <= 4 * MAX_CONNECTIONS + 2, threading.active_count()
            grown = rss() - warm_rss
            assert warm_rss == 0 or grown < 64 << 20, f"ZPS_FUZZ_SEED={run_seed}: grew {grown >> 20} MiB"
            assert all(t.is_alive() for t in cluster.threads)
        finally:
            client.close()


@pytest.mark.cluster
def test_hostile_connections_to_a_relay_port_stop_neither_the_relay_nor_the_worker_it_relays() -> None:
    fuzz_relay(24)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_six_hundred_hostile_connections_to_a_relay_port() -> None:
    fuzz_relay(600)
