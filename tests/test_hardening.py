"""Regression tests for the findings of an adversarial test (issue 11): each message here once crashed a role,
made it allocate without bound, lost updates silently or told a stranger what it should not. Now each gets an
error naming the problem (or, malformed beyond a reply, is dropped), and the role goes on serving, unchanged."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgpack
import pytest
import torch
import zmq

from zps.protocol.messages import MAX_STEP, PROTOCOL_VERSION, ErrorCode, Kind, Message, parse_frames
from zps.protocol.tensors import as_buffer
from zps.worker.client import Client

from .helpers import close_all, local_cluster, run_parallel

pytestmark = pytest.mark.cluster

NUMEL = 16


def dealer(address: str) -> zmq.Socket:
    sock: zmq.Socket = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def ask(sock: zmq.Socket, frames: list, timeout: float = 10.0) -> Message:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout * 1000)), "no answer"
    return parse_frames(sock.recv_multipart())


def head(kind: str, src: str = "worker:0", **fields) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "kind": kind, "id": 5, "src": src, **fields})


def push_frames(key: int, step: int = 0, value: float = 1.0, src: str = "worker:0", **body) -> list:
    entry = {"key": key, "step": step, "nf": 1, "codec": "none", "meta": {}, "bufs": [["float32", NUMEL]]}
    fields = {"keys": [entry], "body": body} if body else {"keys": [entry]}
    return [head("push", src, **fields), as_buffer(torch.full((NUMEL,), value)).tobytes()]


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def served(mode: str = "asp", workers: int = 1, shm: bool = False, **caps) -> Iterator[tuple]:
    """A cluster of one server with two declared keys ('a' = 0..15, 'b' = ones), SGD lr 1, its clients and a raw
    DEALER to the server (which speaks as any worker: no --secure here)."""
    with local_cluster(1, workers, mode, **caps) as cluster:
        clients = cluster.clients(shm=shm)
        tensors = {"a": torch.arange(NUMEL, dtype=torch.float32), "b": torch.ones(NUMEL)}
        run_parallel(lambda c: c.declare(tensors, ("SGD", [{"lr": 1.0}]) if c.rank == 0 else None), clients)
        raw = dealer(clients[0].topology.servers[0])
        try:
            yield cluster, clients, raw, tensors
        finally:
            raw.close()
            close_all(clients)


def values(client, tensors) -> dict[str, torch.Tensor]:
    outs = {k: torch.empty_like(v) for k, v in tensors.items()}
    client.pull(outs, step=0).result(timeout=30)
    return outs


def key(client, name: str) -> int:
    return client.chunks(name)[0].key


def assert_serves(raw: zmq.Socket, src: str = "worker:0") -> None:
    reply = ask(raw, [head("stats", src)])
    assert reply.kind is Kind.OK, reply.body


# -- 1. one message killed the coordinator -------------------------------------------------------------------
def test_no_message_ends_the_coordinator() -> None:
    with local_cluster(1, 2) as cluster:
        clients = cluster.clients()
        coord = dealer(cluster.coordinator.address)
        try:
            poison = [
                head("heartbeat", "worker:\u00b2"),  # isdigit() but not int()
                head("heartbeat", "worker:" + "9" * 4300),  # int() refuses more than 4300 digits
                head("register", body={"role": ["worker"], "rank": 0}),
                head("register", body={"role": "worker", "rank": 1, "pid": "abc"}),
                head("register", body={"role": "worker", "rank": "1"}),
                head("register", body={"role": "worker", "rank": 2**64 - 1}),
                head("done", "worker:\u00b2", body={"exit_code": "x"}),
                head("barrier", body={"name": ["x"]}),
                head("saved", body={"checkpoint": 2**64 - 1, "file": 3}),
                head("push"),
                b"\x93\x01",  # not a header
            ]
            for frames in poison:
                coord.send_multipart([frames])
            # the refusals that can be answered are; then a well-formed request is served as ever
            answered: list[Message] = []
            while coord.poll(2000) and len(answered) < 9:
                answered.append(parse_frames(coord.recv_multipart()))
            # (heartbeats of strangers are ignored; a stranger's DONE is acknowledged and changes nothing)
            assert sorted(m.kind.value for m in answered) == ["error"] * 8 + ["ok"], [m.body for m in answered]
            assert cluster.coordinator.state.value == "running" and cluster.coordinator.error is None
            run_parallel(lambda c: c.barrier("after"), clients)  # the coordinator serves its workers
        finally:
            coord.close()
            close_all(clients)


def test_a_duplicate_rank_is_refused_without_saying_who_holds_it() -> None:
    with local_cluster(1, 2) as cluster, contextlib.ExitStack() as stack:
        pool = stack.enter_context(ThreadPoolExecutor(2))
        first = pool.submit(Client, cluster.worker_config(0))
        deadline = time.monotonic() + 30
        while ("worker", 0) not in cluster.coordinator.members:  # bounded: the registration is on its way
            assert time.monotonic() < deadline, "worker 0 never registered"
            time.sleep(0.01)
        coord = stack.enter_context(contextlib.closing(dealer(cluster.coordinator.address)))
        reply = ask(coord, [head("register", body={"role": "worker", "rank": 0, "host": "x", "pid": 1})])
        assert reply.body["code"] == ErrorCode.CONFLICT.value and "already registered" in reply.body["reason"]
        holder = cluster.coordinator.members[("worker", 0)]
        assert holder.host not in reply.body["reason"] and str(holder.pid) not in reply.body["reason"]
        second = pool.submit(Client, cluster.worker_config(1))
        close_all([first.result(timeout=60), second.result(timeout=60)])


# -- 2. replies built outside the error handling crashed a server --------------------------------------------
def test_a_huge_step_then_stats_leaves_the_server_serving() -> None:
    with served() as (cluster, clients, raw, tensors):
        entry = {"key": key(clients[0], "a"), "step": 2**64 - 1, "nf": 1, "codec": "none", "meta": {},
                 "bufs": [["float32", NUMEL]]}
        reply = ask(raw, [head("push_pull", keys=[entry]), as_buffer(torch.ones(NUMEL)).tobytes()])
        assert reply.body["code"] == ErrorCode.BAD_HEADER.value and str(MAX_STEP) in reply.body["reason"]
        stats = clients[0].stats()  # (digits.py asks at its end: this once crashed the server)
        assert stats[0]["errors"] >= 1
        assert torch.equal(values(clients[0], tensors)["a"], tensors["a"])


def test_a_forged_leave_with_a_shared_memory_pull_waiting_does_not_end_the_server() -> None:
    with served("bsp", workers=2, shm=True) as (cluster, clients, raw, tensors):
        grads = {k: torch.ones_like(v) for k, v in tensors.items()}
        clients[0].push(grads, step=0).result(timeout=30)
        outs = {k: torch.empty_like(v) for k, v in tensors.items()}
        waiting = clients[0].pull(outs, step=1)  # waits for worker 1's push
        assert ask(raw, [head("leave")]).kind is Kind.OK  # forged: worker 0 itself never left
        clients[1].push(grads, step=0).result(timeout=30)
        with contextlib.suppress(Exception):  # an answer or an error, never a hang
            waiting.result(timeout=30)
        assert waiting.done()
        assert_serves(raw, "worker:1")
        after = {k: torch.empty_like(v) for k, v in tensors.items()}
        clients[1].pull(after, step=1).result(timeout=30)
        assert torch.equal(after["a"], tensors["a"] - 1)  # worker 1's step applied, once


# -- 4. unbounded resources from tiny messages -------------------------------------------------------------
CAPS: dict[str, Any] = {"max_key_elements": 1000, "max_keys": 4, "max_header_bytes": 1 << 16,
                        "max_message_bytes": 1 << 20, "max_pending": 4}


def test_every_size_a_peer_claims_is_capped_and_the_error_names_the_setting() -> None:
    with served("bsp", workers=2, **CAPS) as (cluster, clients, raw, tensors):
        before = rss()
        huge = {"key": 90, "name": "huge", "numel": 500_000_000, "nf": 0}
        reply = ask(raw, [head("init", keys=[huge])])  # ~60 bytes that once made a server hold gigabytes
        assert reply.body["code"] == ErrorCode.TOO_LARGE.value and "--max-key-elements" in reply.body["reason"]
        many = [{"key": 100 + i, "name": f"k{i}", "numel": 1, "nf": 0} for i in range(3)]
        reply = ask(raw, [head("init", keys=many)])  # 2 declared + 3 > 4
        assert reply.body["code"] == ErrorCode.TOO_LARGE.value and "--max-keys" in reply.body["reason"]
        reply = ask(raw, [head("stats", body={"pad": "x" * (1 << 17)})])
        assert reply.body["code"] == ErrorCode.TOO_LARGE.value and "--max-header-bytes" in reply.body["reason"]
        bomb = b"\xdd" + (60_000).to_bytes(4, "big") + b"\x90" * 60_000  # 60k empty lists in 60 KB
        reply = ask(raw, [bomb])
        assert reply.body["code"] == ErrorCode.BAD_HEADER.value
        parts = [head("stats")] + [b"\0" * (400 << 10)] * 3  # 1.2 MiB in parts under the cap each
        reply = ask(raw, parts)
        assert reply.body["code"] == ErrorCode.TOO_LARGE.value and "--max-message-bytes" in reply.body["reason"]
        # one frame over the cap: ZeroMQ drops the connection (nothing is answered, nothing is kept)
        big = dealer(clients[0].topology.servers[0])
        try:
            big.send_multipart([head("stats"), b"\0" * (2 << 20)])
            assert not big.poll(500)
        finally:
            big.close()
        # pending requests: a worker keeps at most max_pending waiting (a pull of a future step waits)
        pull = [head("pull", keys=[{"key": key(clients[0], "a"), "step": 1}])]
        for _ in range(CAPS["max_pending"]):
            raw.send_multipart(pull)
        reply = ask(raw, pull)
        assert reply.body["code"] == ErrorCode.TOO_LARGE.value and "--max-pending" in reply.body["reason"]
        assert rss() - before < 64 << 20
        assert_serves(raw, "worker:1")
        assert torch.equal(values(clients[1], tensors)["a"], tensors["a"])


def test_a_header_bomb_under_the_default_caps_is_refused_without_a_spike() -> None:
    with served() as (cluster, clients, raw, tensors):
        before = rss()
        bomb = b"\xdd" + (3_000_000).to_bytes(4, "big") + b"\xc0" * 3_000_000  # 3M nils: once +1.2 GB, seconds
        reply = ask(raw, [bomb])
        assert reply.body["code"] == ErrorCode.BAD_HEADER.value
        reply = ask(raw, [b"\x92" * (16 << 20)])  # 16 MiB of nesting: over the header cap, refused unread
        assert reply.body["code"] == ErrorCode.TOO_LARGE.value
        assert rss() - before < 128 << 20
        assert_serves(raw)


def test_barrier_names_are_capped_in_length_and_number() -> None:
    with local_cluster(1, 2) as cluster:
        clients = cluster.clients()
        coord = dealer(cluster.coordinator.address)
        try:
            reply = ask(coord, [head("barrier", body={"name": "x" * 1000})])
            assert reply.body["code"] == ErrorCode.BAD_HEADER.value and "at most 256" in reply.body["reason"]
            for i in range(64):  # worker 0 waits at 64 barriers (forged), each held open
                coord.send_multipart([head("barrier", body={"name": f"b{i}"})])
            reply = ask(coord, [head("barrier", body={"name": "one more"})])
            assert reply.body["code"] == ErrorCode.CONFLICT.value and "64 barriers" in reply.body["reason"]
            run_parallel(lambda c: c.barrier("b0"), clients)  # an open one still releases
        finally:
            coord.close()
            close_all(clients)


# -- 5. silent data loss -----------------------------------------------------------------------------------
def test_a_huge_asp_step_is_refused_and_later_pushes_still_apply() -> None:
    with served() as (cluster, clients, raw, tensors):
        k = key(clients[0], "a")
        reply = ask(raw, push_frames(k, step=MAX_STEP))
        assert reply.body["code"] == ErrorCode.STEP_AHEAD.value
        for step in range(1, 101):
            assert ask(raw, push_frames(k, step=step)).kind is Kind.OK
        assert torch.equal(values(clients[0], tensors)["a"], tensors["a"] - 100)
        assert clients[0].stats()[0]["duplicates"] == 0


@pytest.mark.parametrize(("hp", "code"), [({"lr": float("inf")}, ErrorCode.BAD_HEADER),
                                        ({"lr": float("nan")}, ErrorCode.BAD_HEADER),
                                        ({"lr": -1.0}, ErrorCode.BAD_OPTIMIZER),
                                        ({"lr": 1e300}, ErrorCode.BAD_OPTIMIZER),
                                        ({"momentum": -0.5}, ErrorCode.BAD_OPTIMIZER),
                                        ({"betas": [0.9, 0.99]}, ErrorCode.BAD_OPTIMIZER),
                                        ({"lr": "fast"}, ErrorCode.BAD_HEADER)])
def test_bad_hyperparameters_are_refused_and_change_nothing(hp: dict, code: ErrorCode) -> None:
    """A step's hyper-parameters that are not numbers, that SGD does not take, or that torch would refuse to build
    it with: refused by name, nothing applied."""
    with served() as (cluster, clients, raw, tensors):
        k = key(clients[0], "a")
        reply = ask(raw, push_frames(k, step=1, hp=[hp]))
        assert reply.body["code"] == code.value and next(iter(hp)) in reply.body["reason"], reply.body
        assert torch.equal(values(clients[0], tensors)["a"], tensors["a"])
        assert ask(raw, push_frames(k, step=1, hp=[{"lr": 0.5}])).kind is Kind.OK  # the same step, sane: applied
        assert torch.equal(values(clients[0], tensors)["a"], tensors["a"] - 0.5)


def test_an_update_that_failed_is_not_taken_for_a_duplicate_when_retried() -> None:
    with served() as (cluster, clients, raw, tensors):
        k = key(clients[0], "a")
        optimizer = cluster.servers[0].shard.keys.optimizers.by_group[0]
        real_step = optimizer.step
        failures: list[int] = []

        def failing_once(*args, **kwargs):
            if not failures:
                failures.append(1)
                raise RuntimeError("injected: the optimizer step failed")
            return real_step(*args, **kwargs)

        optimizer.step = failing_once
        reply = ask(raw, push_frames(k, step=1))
        assert reply.body["code"] == ErrorCode.INTERNAL.value
        assert ask(raw, push_frames(k, step=1)).kind is Kind.OK
        assert torch.equal(values(clients[0], tensors)["a"], tensors["a"] - 1)
        assert clients[0].stats()[0]["duplicates"] == 0


# -- 6. information for anyone who asks --------------------------------------------------------------------
def test_stats_and_conflicts_tell_strangers_nothing() -> None:
    with served() as (cluster, clients, raw, tensors):
        for src in ("server:0", "coordinator", "worker:7", "nobody"):
            reply = ask(raw, [head("stats", src)])
            assert reply.kind is Kind.ERROR and "src" in reply.body["reason"], reply.body
        conflict = {"key": key(clients[0], "a"), "name": "guess", "numel": 3, "nf": 0}
        reply = ask(raw, [head("init", keys=[conflict])])
        assert reply.body["code"] == ErrorCode.CONFLICT.value
        assert "'a'" not in reply.body["reason"] and str(NUMEL) not in reply.body["reason"]
        stats = clients[0].stats()[0]
        assert stats["keys"] == 2 and stats["versions"] == [0, 0]  # a summary, the same size for any model


def test_a_declaration_with_a_non_integer_offset_is_refused_not_left_to_crash_the_loop() -> None:
    # found by the fuzz test: a waiting declaration whose 'offset' was a string crashed the server's loop when its
    # wait ran out (naming the key it waited for)
    with served(workers=2) as (cluster, clients, raw, tensors):
        entry = {"key": 99, "numel": NUMEL, "name": "c", "offset": "x", "nf": 0}
        reply = ask(raw, [head("init", "worker:1", keys=[entry])])
        assert reply.kind is Kind.ERROR and reply.body["code"] == ErrorCode.BAD_HEADER.value
        assert "'offset'" in reply.body["reason"]
        assert 99 not in cluster.servers[0].shard.keys
        assert_serves(raw)
