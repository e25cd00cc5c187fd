"""Compressed push and pull through real sockets: bytes counted at the socket, each codec replayed against a
reference, exact delta tracking, pull codecs by their default spec, user codecs. (Accuracy over seeds:
tests/test_accuracy.py, the slow tier.)"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from zps.protocol.codecs import available_codecs, canonical_spec, make_codec
from zps.protocol.messages import ErrorCode, ProtocolError
from zps.worker import Client

from .helpers import close_all, local_cluster, run_parallel

pytestmark = pytest.mark.cluster

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
            key = client.chunks("w")[0].key
            g = torch.Generator().manual_seed(2)
            for step in range(5):
                client.push_pull({"w": torch.randn(400, generator=g)}, held, step).result()
                view = server.shard.values.view(0, key)
                assert view is not None and torch.equal(held["w"], view)
            truth = server.shard.keys[key].param
            assert truth is not None
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
            assert client.codecs()[client.chunks("w")[0].key].spec() == spec
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


# Each codec with its parameters for the replay; a seed where the codec draws random numbers, so the reference
# draws the same ones.
REPLAYED = [
    "fp16",
    "bf16",
    "int8",
    "qsgd:seed=1",
    "terngrad:seed=2",
    "onebit",
    "topk:ratio=0.05,seed=3",
    "randomk:ratio=0.05,scale=false,seed=4",  # (scaled, error feedback around it diverges: refused)
    "dgc:ratio=0.05,seed=5",
    "powersgd:rank=2,seed=6",
]


@pytest.mark.parametrize("spec", REPLAYED)
def test_each_codec_with_error_feedback_applies_exactly_what_a_reference_computes(spec: str) -> None:
    """BSP, 2 workers, SGD with momentum: after every step the servers hold what an in-process reference computes
    from the same gradients -- each worker's own codec + error feedback, the mean, torch.optim.SGD -- to float noise.
    (BytePS replays its top-k against a reference the same way; accuracy over seeds is the slow tier's.)"""
    numel, steps, lr = 4096, 6, 0.1
    gen = torch.Generator().manual_seed(7)
    start = torch.randn(numel, generator=gen)
    grads = [[torch.randn(numel, generator=gen) for _ in range(2)] for _ in range(steps)]
    with local_cluster(2, 2, "bsp") as cluster:
        clients = cluster.clients(codec=spec, error_feedback=True, compress_min=16, shm=False, chunk_bytes=8192)
        try:
            optimizer = ("SGD", [{"lr": lr, "momentum": 0.9}])
            run_parallel(lambda c: c.declare({"w": start.clone()}, optimizer if c.rank == 0 else None), clients)
            reference = start.clone().requires_grad_(True)
            ref_opt = torch.optim.SGD([reference], lr=lr, momentum=0.9)
            chunks = clients[0].chunks("w")
            assert len(chunks) == 2  # the tensor is cut in two, one chunk per server
            ref_codecs = [[make_codec(spec, error_feedback=True) for _ in chunks] for _ in clients]
            held = [torch.zeros(numel) for _ in clients]
            for step in range(steps):

                def push_pull(c: Client, step: int = step) -> None:
                    c.push_pull({"w": grads[step][c.rank]}, {"w": held[c.rank]}, step).result()

                run_parallel(push_pull, clients)
                mean = torch.empty(numel)
                for chunk, codecs in zip(chunks, zip(*ref_codecs, strict=True), strict=True):
                    part = slice(chunk.offset, chunk.offset + chunk.numel)
                    decoded = []
                    for rank, codec in enumerate(codecs):
                        encoded = codec.encode(grads[step][rank][part])
                        decoded.append(codec.decode(encoded, chunk.numel, torch.float32, "cpu"))
                    mean[part] = (decoded[0].clone().add_(decoded[1])).div_(2)
                reference.grad = mean
                ref_opt.step()
                for rank in range(2):
                    torch.testing.assert_close(held[rank], reference.detach(), atol=1e-6, rtol=0)
        finally:
            close_all(clients)


@pytest.mark.parametrize("codec", [c for c in available_codecs() if c != "none"])
def test_pull_codec_written_without_parameters_compresses_pulls(codec: str) -> None:
    """``--pull-codec int8`` (the codec's defaults) sends deltas exactly as ``int8:chunk=4096`` does: the spec is
    compared in its canonical form on both sides. Bytes are what the server sent (its counter of frame bytes)."""
    numel = 100_000
    with local_cluster(1, 1, "asp") as cluster:
        (client,) = cluster.clients(pull_codec=codec, shm=False)
        try:
            assert client.pull_codec == canonical_spec(codec)
            client.declare(
                {"w": torch.randn(numel, generator=torch.Generator().manual_seed(0))}, ("SGD", [{"lr": 0.1}])
            )
            held = {"w": torch.zeros(numel)}
            server = cluster.servers[0]
            if make_codec(codec).feedback_problem():  # randomk scaled (its default): refused, by name
                refused = f"pull codec of key 0 .*server's error feedback.*{codec}"
                with pytest.raises(ProtocolError, match=refused) as info:
                    client.pull(held, 0).result()
                assert info.value.code is ErrorCode.BAD_CODEC
                return
            client.pull(held, 0).result()  # the first pull is full
            full = numel * 4
            sent = []
            for step in range(3):
                before = server.shard.metrics.payload["out"]
                grad = torch.randn(numel)
                if codec == "nonzero":  # it sends what changed: a sparse push changes 1% (SGD without momentum)
                    grad *= torch.rand(numel) < 0.01
                client.push_pull({"w": grad}, held, step).result()
                sent.append(server.shard.metrics.payload["out"] - before)
            assert max(sent) <= 0.55 * full, (codec, sent, full)  # fp16/bf16 halve it; the others do more
        finally:
            client.close()
