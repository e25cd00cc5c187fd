"""Compressed push and pull through real sockets: bytes counted at the socket, exact delta tracking, user codecs,
and convergence of the digits example under compression."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zps.protocol.messages import ErrorCode, ProtocolError

from .cluster import local_cluster

ROOT = Path(__file__).resolve().parents[1]
NUMEL = 1_000_000


def bytes_received_by(port: int) -> int:
    """TCP payload bytes the listening side of ``port`` received, summed over its connections (from `ss`)."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=True
    ).stdout
    return sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))


def wire_bytes_of_push(codec: str, error_feedback: bool = False) -> int:
    grad = torch.randn(NUMEL, generator=torch.Generator().manual_seed(0))
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients(codec=codec, error_feedback=error_feedback, shm=False)  # count TCP bytes
        try:
            client.declare({"w": torch.zeros(NUMEL)}, ("SGD", [{"lr": 0.0}]))
            port = int(client.topology.servers[0].rsplit(":", 1)[1])
            before = bytes_received_by(port)
            client.push({"w": grad}, step=0).result(timeout=30)
            return bytes_received_by(port) - before
        finally:
            client.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to read socket byte counters")
def test_bytes_on_the_wire_match_theory() -> None:
    plain = wire_bytes_of_push("none")
    assert NUMEL * 4 <= plain < NUMEL * 4 * 1.01
    ratios = {c: plain / wire_bytes_of_push(c) for c in ("fp16", "onebit", "topk:ratio=0.01", "randomk:ratio=0.01")}
    assert 1.95 <= ratios["fp16"] <= 2.0, ratios
    assert ratios["onebit"] >= 30, ratios
    assert ratios["topk:ratio=0.01"] >= 45, ratios
    assert ratios["randomk:ratio=0.01"] >= 90, ratios


def test_compressed_pull_tracks_the_workers_copy_exactly_and_converges() -> None:
    """The server's view of the worker equals what the worker holds, bit for bit; with no new updates, the
    server's error feedback keeps sending what earlier deltas lost, until the worker holds the true values."""
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients(pull_codec="topk:ratio=0.1", compress_min=16)
        try:
            start = torch.randn(400, generator=torch.Generator().manual_seed(1))
            client.declare({"w": start.clone()}, ("SGD", [{"lr": 0.5}]))
            held = {"w": torch.zeros(400)}
            client.pull(held, 0).result()
            torch.testing.assert_close(held["w"], start, atol=0, rtol=0)  # the first pull is full
            server = cluster.servers[0]
            key = client._chunks("w")[0].key
            g = torch.Generator().manual_seed(2)
            for step in range(5):
                client.push_pull({"w": torch.randn(400, generator=g)}, held, step).result()
                view = server._views[(0, key)][0]
                assert torch.equal(held["w"], view)
            truth = server.keys[key].param
            assert (held["w"] - truth).abs().max() > 1e-3  # 10% top-k really is lossy
            errors = []
            for step in range(5, 40):
                client.push_pull({"w": torch.zeros(400)}, held, step).result()
                errors.append((held["w"] - truth).abs().max().item())
            assert errors[-1] < 1e-6, errors
        finally:
            client.close()


def test_user_codec_by_import_path() -> None:
    spec = "examples.half_codec:ScaledHalf"
    with local_cluster(1, 1, "asp", codec=spec) as cluster:
        (client,) = cluster.clients(codec=spec, compress_min=0)
        try:
            client.declare({"w": torch.zeros(64)}, ("SGD", [{"lr": 1.0}]))
            grad = torch.linspace(-3, 5, 64)
            client.push({"w": grad}, 0).result()
            out = {"w": torch.zeros(64)}
            client.pull(out, 0).result()
            torch.testing.assert_close(out["w"], -grad, atol=5e-3, rtol=1e-3)
            assert client._codecs[client._chunks("w")[0].key].spec() == spec
        finally:
            client.close()


def test_server_refuses_an_import_path_it_was_not_configured_with() -> None:
    spec = "examples.half_codec:ScaledHalf"
    with local_cluster(1, 1, "asp") as cluster:  # the servers have no ZPS_CODEC
        (client,) = cluster.clients(codec=spec, compress_min=0)
        try:
            client.declare({"w": torch.zeros(64)}, ("SGD", [{"lr": 1.0}]))
            with pytest.raises(ProtocolError) as info:
                client.push({"w": torch.ones(64)}, 0).result()
            assert info.value.code is ErrorCode.BAD_CODEC
        finally:
            client.close()


def run_digits(tmp_path: Path, name: str, *options: str) -> float:
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "zps.launcher.cli", "run", "--servers", "2", "--workers", "2", *options,
           "examples/digits.py", "--epochs", "20", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ})
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())["test_accuracy"]


def test_compressed_training_stays_within_1_5_points_of_none(tmp_path: Path) -> None:
    baseline = run_digits(tmp_path, "none")
    results = {
        "topk1%+ef": run_digits(tmp_path, "topk", "--codec", "topk:ratio=0.01", "--error-feedback"),
        "onebit+ef": run_digits(tmp_path, "onebit", "--codec", "onebit", "--error-feedback"),
        "qsgd": run_digits(tmp_path, "qsgd", "--codec", "qsgd"),
    }
    assert baseline >= 0.95
    for name, acc in results.items():
        assert acc >= baseline - 0.015, (name, acc, baseline)
