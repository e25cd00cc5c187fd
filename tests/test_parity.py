"""Parity with PyTorch itself: a BSP job equals single-process torch.optim on the same global batches."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from zps.worker import DistributedOptimizer

from .helpers import close_all, local_cluster, run_parallel

pytestmark = pytest.mark.cluster

STEPS = 20
BATCH = 8  # per worker


def _template() -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 3))


_TEMPLATE = _template()


def make_model() -> nn.Module:
    """The same initial model every time; a copy, since worker threads must not share torch's global RNG."""
    return copy.deepcopy(_TEMPLATE)


def batches(num_workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(99)
    return [
        (torch.randn(num_workers * BATCH, 10, generator=g), torch.randn(num_workers * BATCH, 3, generator=g))
        for _ in range(STEPS)
    ]


OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, betas=(0.8, 0.95), weight_decay=1e-4),
}
# Every element-wise optimizer the server offers, with one worker against torch itself.
MORE = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.05, lr_decay=0.01),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5, centered=True),
    "adamax": lambda params: torch.optim.Adamax(params, lr=0.01),
    "nadam": lambda params: torch.optim.NAdam(params, lr=0.01),
    "radam": lambda params: torch.optim.RAdam(params, lr=0.01),
    "adadelta": lambda params: torch.optim.Adadelta(params, lr=0.5),
}


def reference(optimizer: str, data, schedule: bool = False) -> nn.Module:
    """Single process: the gradient of the mean loss over the global batch (= the mean of the workers' gradients)."""
    model = make_model()
    opt = OPTIMIZERS[optimizer](model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5) if schedule else None
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if sched:
            sched.step()
    return model


def train_worker(
    client,
    rank: int,
    num_workers: int,
    optimizer: str,
    data,
    schedule: bool = False,
    overlap: bool = True,
    schedule_on: str = "distributed",
) -> nn.Module:
    model = make_model()
    if rank > 0:  # prove that non-zero ranks start from what they pull, not from their own initial values
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    local = OPTIMIZERS[optimizer](model.parameters())
    opt = DistributedOptimizer(local, model, client=client, overlap=overlap, bucket_bytes=256)
    # a scheduler on the DistributedOptimizer itself (it is a torch.optim.Optimizer), or on the wrapped one
    sched = (
        torch.optim.lr_scheduler.StepLR(opt if schedule_on == "distributed" else local, step_size=5, gamma=0.5)
        if schedule
        else None
    )
    for x, y in data:
        xs, ys = x[rank * BATCH : (rank + 1) * BATCH], y[rank * BATCH : (rank + 1) * BATCH]
        opt.zero_grad()
        nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
        if sched:
            sched.step()
    return model


def assert_same(expected: nn.Module, got: nn.Module) -> None:
    for (name, a), b in zip(expected.named_parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=functools.partial("{}: {}".format, name))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("num_servers", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_bsp_matches_single_process(num_workers: int, num_servers: int, optimizer: str) -> None:
    data = batches(num_workers)
    expected = reference(optimizer, data)
    with local_cluster(num_servers, num_workers, "bsp") as cluster:
        # tiny chunks, so every weight matrix is cut and spread over all servers
        clients = cluster.clients(chunk_bytes=128)
        try:
            models = run_parallel(
                lambda r: train_worker(clients[r], r, num_workers, optimizer, data), range(num_workers)
            )
        finally:
            close_all(clients)
    for model in models:
        assert_same(expected, model)
    if num_workers > 1:  # the test would pass trivially if no step was taken
        assert not torch.allclose(models[0].get_parameter("0.weight"), make_model().get_parameter("0.weight"))


@pytest.mark.parametrize("chunk_bytes", [128, 1 << 20])
def test_bsp_over_frames_matches_single_process(chunk_bytes: int) -> None:
    """Without shared memory: small keys share a fused frame each way, larger values land by recv_into."""
    data = batches(2)
    expected = reference("adam", data)
    with local_cluster(2, 2, "bsp") as cluster:
        clients = cluster.clients(chunk_bytes=chunk_bytes, shm=False)
        try:
            models = run_parallel(lambda r: train_worker(clients[r], r, 2, "adam", data), range(2))
            stats = clients[0].stats()
        finally:
            close_all(clients)
    for model in models:
        assert_same(expected, model)
    assert sum(s["shm_bytes_in"] for s in stats) == 0 and sum(s["bytes_in"] for s in stats) > 0


@pytest.mark.parametrize("schedule_on", ["distributed", "wrapped"])
def test_lr_scheduler_on_the_worker_reaches_the_servers(schedule_on: str) -> None:
    data = batches(2)
    expected = reference("sgd_momentum", data, schedule=True)
    unscheduled = reference("sgd_momentum", data)
    with local_cluster(2, 2, "bsp") as cluster:
        clients = cluster.clients(chunk_bytes=256)
        try:
            models = run_parallel(
                lambda r: train_worker(clients[r], r, 2, "sgd_momentum", data, schedule=True, schedule_on=schedule_on),
                range(2),
            )
        finally:
            close_all(clients)
    assert_same(expected, models[0])
    assert not torch.allclose(expected.get_parameter("0.weight"), unscheduled.get_parameter("0.weight"), atol=1e-5)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_asp_with_one_worker_matches_single_process(optimizer: str) -> None:
    data = batches(1)
    expected = reference(optimizer, data)
    with local_cluster(2, 1, "asp") as cluster:
        (client,) = cluster.clients(chunk_bytes=128)
        try:
            model = train_worker(client, 0, 1, optimizer, data)
        finally:
            client.close()
    assert_same(expected, model)


def test_param_groups_keep_their_own_hyperparameters() -> None:
    data = batches(1)

    def build(model):
        return torch.optim.SGD(
            [
                {"params": model[0].parameters(), "lr": 0.1},
                {"params": model[2].parameters(), "lr": 0.01, "momentum": 0.5},
            ],
            lr=0.05,
        )

    ref = make_model()
    opt = build(ref)
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        opt.step()
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients()
        try:
            model = make_model()
            dist = DistributedOptimizer(build(model), model, client=client)
            for x, y in data:
                dist.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                dist.step()
        finally:
            client.close()
    assert_same(ref, model)


@pytest.mark.parametrize("mode", ["bsp", "asp"])
def test_without_overlap_the_result_is_the_same(mode: str) -> None:
    workers = 2 if mode == "bsp" else 1
    data = batches(workers)
    expected = reference("adam", data)
    with local_cluster(2, workers, mode) as cluster:
        clients = cluster.clients(chunk_bytes=128)
        try:
            models = run_parallel(
                lambda r: train_worker(clients[r], r, workers, "adam", data, overlap=False), range(workers)
            )
        finally:
            close_all(clients)
    assert_same(expected, models[0])


def test_gradient_accumulation_pushes_once_per_step() -> None:
    """Two backward passes per step: the pushed gradient is their sum, as in single-process training."""
    data = batches(1)
    ref = make_model()
    opt = OPTIMIZERS["sgd_momentum"](ref.parameters())
    for x, y in data:
        opt.zero_grad()
        for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
            nn.functional.mse_loss(ref(x[half]), y[half]).backward()
        opt.step()
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients()
        try:
            model = make_model()
            dist = DistributedOptimizer(
                OPTIMIZERS["sgd_momentum"](model.parameters()),
                model,
                client=client,
                overlap=True,
                backward_passes_per_step=2,
                bucket_bytes=64,
            )  # hooks count the passes
            for x, y in data:
                dist.zero_grad()
                for half in (slice(0, BATCH // 2), slice(BATCH // 2, BATCH)):
                    nn.functional.mse_loss(model(x[half]), y[half]).backward()
                dist.step()
        finally:
            client.close()
    assert_same(ref, model)


def test_overlap_is_on_by_default_only_for_gpu_models() -> None:
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients()
        try:
            model = make_model()
            assert (
                DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, client=client).overlap is False
            )
        finally:
            client.close()


def test_a_gradient_changed_after_its_push_is_refused_not_ignored() -> None:
    """With overlap, gradients leave during backward from the second step on (the first shows whether the script
    changes them after backward): one changed after it left is refused, naming the ways out."""
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients()
        try:
            model = make_model()
            dist = DistributedOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.1), model, client=client, overlap=True, bucket_bytes=64
            )
            data = batches(1)
            for x, y in data[:2]:
                dist.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                dist.step()
            x, y = data[2]
            dist.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            with pytest.raises(RuntimeError, match="opt.clip_grad_norm_.*overlap=False"):
                dist.step()
        finally:
            client.close()


def test_changing_gradients_in_the_first_step_keeps_overlap_off_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """A script that clips with torch's function (local meaning) gets its clipped gradients sent at step time, a
    warning naming opt.clip_grad_norm_ once, and the result of clipping each worker's own gradient."""
    data = batches(1)
    expected = make_model()
    local = torch.optim.SGD(expected.parameters(), lr=0.1)
    for x, y in data[:4]:
        local.zero_grad()
        nn.functional.mse_loss(expected(x), y).backward()
        torch.nn.utils.clip_grad_norm_(expected.parameters(), 0.05)
        local.step()
    with local_cluster(1, 1, "bsp") as cluster, caplog.at_level("WARNING", logger="zps.worker"):
        (client,) = cluster.clients()
        try:
            model = make_model()
            dist = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, client=client,
                                        overlap=True, bucket_bytes=64)
            for x, y in data[:4]:
                dist.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                dist.step()
        finally:
            client.close()
    assert_same(expected, model)
    said = [r.getMessage() for r in caplog.records]
    assert sum("opt.clip_grad_norm_(max_norm)" in m for m in said) == 1, said
    assert sum("overlap off" in m for m in said) == 1, said


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradients_on_the_gpu_give_the_same_result() -> None:
    data = batches(1)
    expected = reference("adam", data)
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients(chunk_bytes=256)
        try:
            model = make_model().cuda()
            dist = DistributedOptimizer(OPTIMIZERS["adam"](model.parameters()), model, client=client)
            for x, y in data:
                dist.zero_grad()
                nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
                dist.step()
        finally:
            client.close()
    assert_same(expected, model.cpu())


@pytest.mark.parametrize("optimizer", sorted(MORE))
def test_every_server_optimizer_matches_torch(optimizer: str, monkeypatch) -> None:
    monkeypatch.setitem(OPTIMIZERS, optimizer, MORE[optimizer])
    data = batches(2)
    expected = reference(optimizer, data)
    with local_cluster(2, 2, "bsp") as cluster:
        clients = cluster.clients(chunk_bytes=256)
        try:
            models = run_parallel(lambda r: train_worker(clients[r], r, 2, optimizer, data), range(2))
        finally:
            close_all(clients)
    assert_same(expected, models[1])
