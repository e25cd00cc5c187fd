"""The same-host fast path: shared memory when worker and server share a host, frames otherwise."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import pytest
import torch

from zps.protocol.shm import Segment, ShmUnavailable

from .helpers import local_cluster

pytestmark = pytest.mark.cluster


def run_asp(shm: bool, monkeypatch, refuse_attach: bool = False):
    """Train 3 ASP steps; return the servers' stats and the segments in use."""
    created: list[Segment] = []
    original = Segment.create.__func__  # type: ignore[attr-defined]  # the function under the classmethod

    def recording_create(cls, data_bytes):
        segment = original(cls, data_bytes)
        created.append(segment)
        return segment

    monkeypatch.setattr(Segment, "create", classmethod(recording_create))
    if refuse_attach:

        def refuse(*args, **kwargs):
            raise ShmUnavailable("pretend the server is on another host")

        monkeypatch.setattr("zps.ps._shm.Segment.attach", refuse)
    with local_cluster(2, 1, "asp") as cluster:
        (client,) = cluster.clients(shm=shm, chunk_bytes=4096)
        try:
            start = torch.arange(5000, dtype=torch.float32)
            client.declare({"w": start.clone(), "b": torch.zeros(3)}, ("SGD", [{"lr": 0.5}]))
            held = {"w": torch.zeros(5000), "b": torch.zeros(3)}
            client.pull(held, 0).result()
            for step in range(3):
                grads = {"w": torch.full((5000,), float(step + 1)), "b": torch.ones(3)}
                client.push_pull(grads, held, step).result()
            stats = client.stats()
            segments = sum(client._areas.has(s) for s in range(len(cluster.servers)))
        finally:
            client.close()
    # lr 0.5 x (1 + 2 + 3)
    torch.testing.assert_close(held["w"], start - 3.0, atol=0, rtol=0)
    torch.testing.assert_close(held["b"], torch.full((3,), -1.5), atol=0, rtol=0)
    # memfds: no name anywhere; the worker's descriptors were given up once the servers mapped (or refused) them
    assert bool(created) == shm and all(s.fd is None for s in created)
    return stats, segments


def test_same_host_moves_tensor_bytes_through_shared_memory(monkeypatch) -> None:
    stats, segments = run_asp(shm=True, monkeypatch=monkeypatch)
    assert segments == 2
    assert sum(s["shm_bytes_in"] for s in stats) == 3 * 5003 * 4
    assert sum(s["shm_bytes_out"] for s in stats) == 4 * 5003 * 4
    assert sum(s["bytes_in"] for s in stats) == 5003 * 4  # only rank 0's initial values went as frames


def test_falls_back_to_frames_when_the_server_cannot_map_it(monkeypatch) -> None:
    stats, segments = run_asp(shm=True, monkeypatch=monkeypatch, refuse_attach=True)
    assert segments == 0
    assert sum(s["shm_bytes_in"] + s["shm_bytes_out"] for s in stats) == 0
    assert sum(s["bytes_in"] for s in stats) >= 4 * 5003 * 4


def test_switched_off(monkeypatch) -> None:
    stats, segments = run_asp(shm=False, monkeypatch=monkeypatch)
    assert segments == 0 and sum(s["shm_bytes_in"] for s in stats) == 0


def test_attach_takes_only_the_workers_own_sealed_segment() -> None:
    seg = Segment.create(1024)
    try:
        desc: dict[str, Any] = seg.describe()
        assert desc["pid"] == os.getpid()
        with pytest.raises(ShmUnavailable, match="not the pid the worker registered with"):
            Segment.attach(desc, os.getpid() + 1)
        with pytest.raises(ShmUnavailable, match="token"):
            Segment.attach({**desc, "token": "00" * 16}, os.getpid())
        with pytest.raises(ShmUnavailable, match="bytes"):
            Segment.attach({**desc, "size": desc["size"] + 64}, os.getpid())
        with pytest.raises(OSError):  # sealed: nobody can shrink it under a server's mapping (no SIGBUS)
            os.ftruncate(desc["fd"], 16)
        other = Segment.attach(desc, os.getpid())
        other.view(Segment.data_start(), 4).copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        assert seg.view(Segment.data_start(), 4).tolist() == [1.0, 2.0, 3.0, 4.0]
        with pytest.raises(ValueError):
            other.view(0, 4)  # the token header is not data
        with pytest.raises(ValueError):
            other.view(Segment.data_start(), 10_000)
        other.close()
    finally:
        seg.close()


def test_attach_refuses_a_file_that_is_not_a_sealed_memfd(tmp_path) -> None:
    """A named file (what an attacker could point at, or truncate under the server) is never mapped."""
    path = tmp_path / "plain"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    try:
        desc = {"pid": os.getpid(), "fd": fd, "size": 4096, "token": "00" * 16}
        with pytest.raises(ShmUnavailable, match="not sealed"):
            Segment.attach(desc, os.getpid())
        with pytest.raises(ShmUnavailable, match="cannot open"):
            Segment.attach({**desc, "fd": 100_000}, os.getpid())
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a segment of another user")
def test_attach_refuses_another_users_segment() -> None:
    """Another user's sealed memfd, even one root can open: the server maps only its own user's."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other user: make a segment, say where it is, wait to be killed
        try:
            os.setuid(65534)
            seg = Segment.create(1024)
            os.write(write, json.dumps(seg.describe()).encode())
            time.sleep(60)  # the parent kills this process as soon as it has read the description
        finally:
            os._exit(0)
    try:
        os.close(write)
        desc = json.loads(os.read(read, 4096))
        with pytest.raises(ShmUnavailable, match="belongs to uid 65534"):
            Segment.attach(desc, pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
