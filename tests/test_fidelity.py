"""DDP fidelity on real clusters (threads in this process, or ``zps run``): a held BSP step and its commit, rank 0's
buffers at synchronize, a script run with no launcher, and deterministic BSP (the same job gives the same bits on
every run, whatever order pushes arrive in: issue 26)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zps.protocol import checkpoint as ckpt
from zps.protocol.bodies import Commit
from zps.worker import DistributedOptimizer

from .helpers import ROOT, close_all, finish, local_cluster, run_parallel, start, wait_for_no_tagged

pytestmark = pytest.mark.cluster
SCRIPT = str(ROOT / "tests" / "scripts" / "train_steps.py")


def test_a_held_step_is_inspected_then_applied_as_its_commit_says() -> None:
    """Pushes held: INSPECT gives each key's aggregate norm (torch's, of the workers' average) and finiteness; a
    commit that skips versions the keys without stepping them; one with factors scales the aggregate first."""
    with local_cluster(2, 2, "bsp") as cluster:
        clients = cluster.clients(chunk_bytes=64)
        try:
            values = {"a": torch.zeros(40), "b": torch.zeros(3)}
            run_parallel(lambda c: c.declare(values, ("SGD", [{"lr": 1.0}]) if c.rank == 0 else None), clients)
            grads: list[dict[str, torch.Tensor | None]] = [{"a": torch.randn(40), "b": torch.randn(3)},
                                                           {"a": torch.randn(40), "b": None}]
            run_parallel(lambda c: c.push(grads[c.rank], 0, hold=True).result(timeout=30), clients)
            stats = clients[1].inspect(["a", "b"], 0, 2.0).result(timeout=30)
            a0, a1, b0 = grads[0]["a"], grads[1]["a"], grads[0]["b"]
            assert a0 is not None and a1 is not None and b0 is not None
            average = {"a": (a0 + a1) / 2, "b": b0 / 2}
            for name, expected in average.items():
                chunks = clients[0].chunks(name)
                norms = torch.tensor([stats[c.key].norm for c in chunks])
                assert all(stats[c.key].finite for c in chunks)
                total = norms[0] if len(chunks) == 1 else torch.linalg.vector_norm(norms)
                torch.testing.assert_close(total, torch.linalg.vector_norm(expected), rtol=1e-6, atol=0)
            assert len(clients[0].chunks("a")) > 1  # the norm of a parameter cut over servers is composed
            outs = [{"a": torch.empty(40), "b": torch.empty(3)} for _ in clients]
            skip = Commit(step=0, skip=True, mul=[], hp=None)
            run_parallel(lambda c: c.pull(outs[c.rank], 1, commit=skip).result(timeout=30), clients)
            assert all(torch.equal(o["a"], values["a"]) for o in outs)  # skipped everywhere, versions moved on
            run_parallel(lambda c: c.push(grads[c.rank], 1, hold=True).result(timeout=30), clients)
            scale = Commit(step=1, skip=False, mul=[0.5, 0.25], hp=[{"lr": 2.0}])
            run_parallel(lambda c: c.pull(outs[c.rank], 2, commit=scale).result(timeout=30), clients)
            for name, expected in average.items():
                assert torch.equal(outs[1][name], -2.0 * (expected * 0.5 * 0.25)), name
        finally:
            close_all(clients)


def test_synchronize_gives_every_worker_rank_0s_buffers() -> None:
    """DDP's broadcast_buffers: after synchronize, every worker holds rank 0's BatchNorm statistics, bit for bit
    (num_batches_tracked, an int64, too)."""
    with local_cluster(1, 2, "bsp") as cluster:
        clients = cluster.clients()
        try:
            torch.manual_seed(0)
            models = [torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)) for _ in clients]
            opts = run_parallel(lambda c: DistributedOptimizer(torch.optim.SGD(models[c.rank].parameters(), lr=0.1),
                                                               models[c.rank], client=c), clients)

            def train(rank: int) -> None:
                g = torch.Generator().manual_seed(rank)
                for _ in range(3 + rank):  # different data, and different counts of forwards
                    models[rank](torch.randn(8, 4, generator=g)).pow(2).mean().backward()
                opts[rank].step()
                opts[rank].synchronize()

            run_parallel(train, range(2))
            for name, buffer in models[0].named_buffers():
                assert torch.equal(dict(models[1].named_buffers())[name], buffer), name
            assert int(dict(models[1].named_buffers())["1.num_batches_tracked"]) == 3  # rank 0's count, not its 4
        finally:
            close_all(clients)


def test_a_script_started_without_a_launcher_runs_as_the_only_worker() -> None:
    """``python script.py``: no ZPS_ROLE, so the script is the only worker and its optimizer steps here -- the bits
    of the same loop in plain torch (scheduler, clip, a skipping GradScaler, a sampler), and it says so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZPS_", "DMLC_")) and k not in ("RANK",
                                                                                                   "WORLD_SIZE")}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "alone.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("SAME"), done.stdout + done.stderr
    assert "runs as the only worker" in done.stderr


def test_half_precision_parameters_keep_float32_masters_on_the_servers() -> None:
    """bf16 parameters: the servers step float32 values and the worker holds their rounding to bf16 -- the same
    bits as a float32 master copy stepped with the bf16 gradients and cast back each step."""
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients()
        try:
            torch.manual_seed(0)
            model = torch.nn.Linear(4, 3).to(torch.bfloat16)
            twin = torch.nn.Linear(4, 3).to(torch.bfloat16)
            twin.load_state_dict(model.state_dict())
            masters = [p.detach().float() for p in twin.parameters()]
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, client=client)
            g = torch.Generator().manual_seed(1)
            for _ in range(5):
                x = torch.randn(8, 4, generator=g).to(torch.bfloat16)
                for net in (model, twin):
                    net.zero_grad()
                    net(x).float().pow(2).mean().backward()
                opt.step()
                with torch.no_grad():
                    for master, p in zip(masters, twin.parameters(), strict=True):
                        assert p.grad is not None
                        master.add_(p.grad.float(), alpha=-0.1)
                        p.copy_(master)
            for a, b in zip(model.parameters(), twin.parameters(), strict=True):
                assert a.dtype is torch.bfloat16 and torch.equal(a, b)
        finally:
            client.close()


def test_a_resumed_script_that_counts_its_own_steps_is_warned(tag: str, tmp_path: Path) -> None:
    """Resumed, a script that reads neither opt.steps nor opt.resumed and draws no data from a zps sampler probably
    starts counting from 0 again: zps says so, once."""
    script = tmp_path / "naive.py"
    script.write_text(
        "import torch\nfrom zps import worker\nworker.init()\nmodel = torch.nn.Linear(2, 1)\n"
        "opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)\n"
        "for i in range(6):\n    opt.zero_grad()\n    model(torch.ones(1, 2)).sum().backward()\n    opt.step()\n")
    job = ["run", "--servers", "1", "--workers", "1", "--checkpoint-dir", str(tmp_path / "ckpt"),
           "--checkpoint-every", "3"]
    code, text = finish(start(tag, [*job, str(script)]), timeout=120)
    assert code == 0, text
    code, text = finish(start(tag, [*job, "--resume", "latest", str(script)]), timeout=120)
    assert code == 0, text
    assert "resumed from" in text and text.count("read neither opt.steps nor opt.resumed") == 1, text
    assert wait_for_no_tagged(tag, within=10) == []


# -- deterministic BSP (issue 26) -------------------------------------------------------------------------------
def _job(tag: str, out: Path, workers: int, servers: int, straggler: int, extra: tuple[str, ...],
         ) -> dict[str, torch.Tensor]:
    """The same job, with worker ``straggler`` 3x slower (so pushes arrive in another order); its final parameters
    and, without --replicas, every tensor of its last checkpoint (values and optimizer state)."""
    job = ["run", "--servers", str(servers), "--workers", str(workers), "--straggler", f"{straggler}:3", *extra]
    if "--replicas" not in extra:
        job += ["--checkpoint-dir", str(out / "ckpt"), "--checkpoint-every", "12"]
    code, text = finish(start(tag, [*job, SCRIPT, "--steps", "12", "--wide", "3", "--out", str(out / "final.st")]),
                        timeout=240)
    assert code == 0, text
    assert wait_for_no_tagged(tag, within=10) == []
    found = {f"final.{k}": v for k, v in load_file(str(out / "final.st")).items()}
    if "--replicas" not in extra:
        for part in sorted((ckpt.directory(out / "ckpt", 12)).glob("server-*.safetensors")):
            found.update({f"{part.name}.{k}": v for k, v in load_file(str(part)).items()})
    return found


def _twice_the_same(tag: str, tmp_path: Path, workers: int, servers: int, extra: tuple[str, ...]) -> None:
    a = _job(tag, tmp_path / "a", workers, servers, 0, extra)
    b = _job(tag, tmp_path / "b", workers, servers, workers - 1, extra)
    assert a.keys() == b.keys() and any(k.startswith("server-") for k in a) == ("--replicas" not in extra)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ between two runs of one job: {differ[:5]}"


def test_bsp_gives_the_same_bits_on_every_run_with_three_workers(tag: str, tmp_path: Path) -> None:
    _twice_the_same(tag, tmp_path, 3, 2, ("--codec", "topk:ratio=0.1", "--error-feedback", "--compress-min", "16"))


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "servers", "extra"), [
    (3, 1, ()), (4, 1, ()), (4, 2, ()), (3, 2, ()),
    (4, 2, ("--codec", "topk:ratio=0.1", "--error-feedback", "--compress-min", "16")),
    (3, 2, ("--replicas", "1")), (4, 3, ("--replicas", "1")),
])
def test_bsp_gives_the_same_bits_on_every_run(workers: int, servers: int, extra: tuple[str, ...], tag: str,
                                              tmp_path: Path) -> None:
    _twice_the_same(tag, tmp_path, workers, servers, extra)


@pytest.mark.slow
def test_with_arrival_order_sums_the_two_runs_differ(tag: str, tmp_path: Path) -> None:
    """The check above can fail: summed as pushes arrive (--bsp-sum arrival), the two runs, whose stragglers
    differ, end with different bits."""
    extra = ("--bsp-sum", "arrival")
    a = _job(tag, tmp_path / "a", 4, 1, 0, extra)
    b = _job(tag, tmp_path / "b", 4, 1, 3, extra)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_a_worker_with_another_model_fails_the_job_at_once_naming_both(tag: str, tmp_path: Path) -> None:
    """Worker 1 builds an extra layer: its declaration is refused as soon as it reaches a server that knows
    worker 0's model (not after --timeout), and the message names both workers and their models."""
    script = tmp_path / "extra.py"
    script.write_text(
        "import torch\nfrom zps import worker\nclient = worker.init()\n"
        "layers = [torch.nn.Linear(4, 4)] + ([torch.nn.Linear(4, 4)] if client.rank == 1 else [])\n"
        "model = torch.nn.Sequential(*layers)\n"
        "opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)\n")
    code, text = finish(start(tag, ["run", "--servers", "2", "--workers", "2", "--timeout", "60", str(script)]),
                        timeout=50)
    assert code != 0
    assert "declares a model of" in text and "every worker must build the same model" in text, text
    assert "worker 0" in text and "worker 1" in text
    assert wait_for_no_tagged(tag, within=10) == []
