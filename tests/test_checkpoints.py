"""Checkpoints in one process (coordinator and servers in threads, real sockets): ASP and SSP record each
server's versions, a full disk loses only the checkpoint being written, a checkpoint of another model or
optimizer is refused by the servers naming it."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from zps.protocol import checkpoint as ckpt
from zps.protocol.messages import ErrorCode, ProtocolError
from zps.worker import DistributedOptimizer

from .helpers import close_all, local_cluster, run_parallel

pytestmark = pytest.mark.cluster


def model(width: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, 2))


def train(root: Path, mode: str, steps: int, resume: str = "") -> list[int]:
    """2 servers x 2 workers, Adam, a checkpoint every 2 steps; each worker's final step."""
    staleness = 1 if mode == "ssp" else 0
    with local_cluster(
        2, 2, mode, checkpoint_dir=str(root), checkpoint_every="2", staleness=staleness, resume=resume
    ) as cluster:
        clients = cluster.clients(chunk_bytes=64)
        try:
            models = [model() for _ in clients]
            opts = run_parallel(
                lambda c: DistributedOptimizer(
                    torch.optim.Adam(models[c.rank].parameters(), lr=0.01), models[c.rank], client=c
                ),
                clients,
            )

            def run(rank: int) -> int:
                g = torch.Generator().manual_seed(rank)
                while opts[rank].steps < steps:
                    opts[rank].zero_grad()
                    models[rank](torch.randn(4, 6, generator=g)).pow(2).mean().backward()
                    opts[rank].step()
                return opts[rank].steps

            return run_parallel(run, range(2))
        finally:
            close_all(clients)


@pytest.mark.parametrize("mode", ["asp", "ssp"])
def test_asp_and_ssp_checkpoints_record_each_servers_versions_and_resume(mode: str, tmp_path: Path) -> None:
    train(tmp_path / "a", mode, 6)
    newest = ckpt.resolve(tmp_path / "a")
    assert newest.checkpoint == 6
    for entry in newest.body["servers"]:
        low, high = entry["versions"]
        assert 0 < low <= high  # no cut: each key's own count of updates, as it was when worker 0 asked
    assert {w["rank"]: w["step"] for w in newest.body["workers"]}[0] == 6
    assert train(tmp_path / "a", mode, 10, resume=str(newest.path)) == [10, 10]
    assert ckpt.resolve(tmp_path / "a").checkpoint == 10


def test_a_full_disk_loses_only_the_checkpoint_being_written(tmp_path: Path, monkeypatch) -> None:
    real = ckpt.save_part
    calls = {"n": 0}

    def save_part(path: Path, tensors: dict, meta: dict) -> int:
        calls["n"] += 1
        if meta.get("checkpoint") == 4:  # every part of checkpoint 4 finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors, meta)

    real_finish = ckpt.PartWriter.finish

    def finish(self: ckpt.PartWriter, meta: dict) -> int:  # the servers' streamed parts
        calls["n"] += 1
        if meta.get("checkpoint") == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_finish(self, meta)

    monkeypatch.setattr(ckpt, "save_part", save_part)
    monkeypatch.setattr(ckpt.PartWriter, "finish", finish)
    assert train(tmp_path, "bsp", 6) == [6, 6]  # training went on
    assert [p.name for p in ckpt.complete(tmp_path)] == ["ckpt-000000002", "ckpt-000000006"]
    assert not (ckpt.directory(tmp_path, 4) / ckpt.MANIFEST).exists() and calls["n"] >= 12


def test_the_servers_refuse_a_checkpoint_of_another_model_or_optimizer(tmp_path: Path) -> None:
    train(tmp_path, "bsp", 2)
    for build, words in [
        (lambda m: torch.optim.Adam(m.parameters(), lr=0.01), "another model"),
        (lambda m: torch.optim.SGD(m.parameters(), lr=0.01), "written with the server optimizer Adam"),
    ]:
        with local_cluster(2, 1, "bsp", resume=str(ckpt.resolve(tmp_path).path)) as cluster:
            (client,) = cluster.clients(chunk_bytes=64)
            try:
                other = model(width=16) if "model" in words else model()
                with pytest.raises(ProtocolError) as info:
                    DistributedOptimizer(build(other), other, client=client)
                assert info.value.code is ErrorCode.CONFLICT
                assert words in str(info.value) and str(tmp_path) in str(info.value), info.value
            finally:
                client.close()
