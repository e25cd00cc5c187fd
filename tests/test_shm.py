"""The same-host fast path: shared memory when worker and server share a host, frames otherwise."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from zps.protocol.shm import Segment, ShmUnavailable

from .helpers import local_cluster

pytestmark = pytest.mark.cluster


def run_asp(shm: bool, monkeypatch, refuse_attach: bool = False):
    """Train 3 ASP steps; return the servers' stats, the segments in use, and the paths of those created."""
    created: list[str] = []
    original = Segment.create.__func__  # type: ignore[attr-defined]  # the function under the classmethod

    def recording_create(cls, data_bytes):
        segment = original(cls, data_bytes)
        created.append(segment.path)
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
    assert bool(created) == shm and not any(os.path.exists(p) for p in created)  # nothing left in /dev/shm
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


def test_attach_refuses_anything_but_the_workers_own_segment() -> None:
    seg = Segment.create(1024)
    try:
        desc: dict[str, Any] = seg.describe()
        with pytest.raises(ShmUnavailable, match="not a zps shared-memory segment"):
            Segment.attach("/etc/passwd", desc["size"], desc["token"])
        with pytest.raises(ShmUnavailable, match="token"):
            Segment.attach(desc["path"], desc["size"], "00" * 16)
        with pytest.raises(ShmUnavailable, match="bytes"):
            Segment.attach(desc["path"], desc["size"] + 64, desc["token"])
        other = Segment.attach(desc["path"], desc["size"], desc["token"])
        other.view(Segment.data_start(), 4).copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        assert seg.view(Segment.data_start(), 4).tolist() == [1.0, 2.0, 3.0, 4.0]
        with pytest.raises(ValueError):
            other.view(0, 4)  # the token header is not data
        with pytest.raises(ValueError):
            other.view(Segment.data_start(), 10_000)
        other.close()
    finally:
        seg.unlink()
        seg.close()
