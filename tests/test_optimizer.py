"""DistributedOptimizer as a torch.optim.Optimizer: schedulers, state_dict, synchronize(), the job's --optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zps.protocol.codecs import ErrorFeedback
from zps.protocol.optim_spec import check_job_optimizer, describe_optimizer
from zps.worker import DistributedOptimizer

from .helpers import close_all, local_cluster, run_parallel

pytestmark = pytest.mark.cluster


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))


def _step(opt: torch.optim.Optimizer, model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
    opt.step()


def test_it_is_an_instance_of_the_wrapped_optimizers_class_sharing_its_param_groups() -> None:
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients()
        try:
            model = _model()
            inner = torch.optim.Adam(model.parameters(), lr=0.01)
            opt = DistributedOptimizer(inner, model, client=client)
            assert isinstance(opt, torch.optim.Adam) and isinstance(opt, torch.optim.Optimizer)
            assert type(opt).__name__ == "DistributedAdam"
            assert opt.param_groups[0] is inner.param_groups[0]
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # TypeError before 0.2
            _step(opt, model, 0)
            scheduler.step()
            assert inner.param_groups[0]["lr"] == pytest.approx(0.005)
            with pytest.raises(TypeError, match="already a DistributedOptimizer"):
                DistributedOptimizer(opt, model, client=client)
        finally:
            client.close()


def test_state_dict_round_trips_steps_learning_rates_and_error_feedback_residuals() -> None:
    with local_cluster(1, 1, "bsp") as cluster:
        (client,) = cluster.clients(codec="topk:ratio=0.1", error_feedback=True, compress_min=8)
        try:
            model = _model()
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, client=client)
            for step in range(3):
                _step(opt, model, step)
            opt.param_groups[0]["lr"] = 0.05
            state = opt.state_dict()
            assert state["zps"]["steps"] == 3
            residuals = state["zps"]["residuals"]
            assert residuals and all(r.abs().sum() > 0 for r in residuals.values())  # top-k 10% left something
            saved = {k: r.clone() for k, r in residuals.items()}
            for step in range(3, 5):  # the state moves on...
                _step(opt, model, step)
            opt.load_state_dict(state)  # ...and comes back
            assert opt.steps == 3 and opt.param_groups[0]["lr"] == 0.05 and opt.inner.param_groups[0]["lr"] == 0.05
            for key, residual in saved.items():
                codec = client.push_codec(key)
                assert isinstance(codec, ErrorFeedback)
                torch.testing.assert_close(codec.residual, residual, atol=0, rtol=0)
        finally:
            client.close()


def test_synchronize_leaves_every_worker_holding_the_servers_model_in_asp() -> None:
    """In ASP a worker's copy trails the servers' model (the others' pushes land after its last pull);
    synchronize() waits for every worker and pulls the servers' values."""
    with local_cluster(2, 2, "asp") as cluster:
        clients = cluster.clients(chunk_bytes=64)
        try:
            models = [_model() for _ in clients]
            opts = run_parallel(
                lambda c: DistributedOptimizer(
                    torch.optim.SGD(models[c.rank].parameters(), lr=0.1), models[c.rank], client=c
                ),
                clients,
            )

            def train(rank: int) -> None:
                for step in range(4 + 3 * rank):  # uneven: worker 1 runs on after worker 0 stopped
                    _step(opts[rank], models[rank], 100 * rank + step)
                opts[rank].synchronize()

            run_parallel(lambda r: train(r), range(2))
            for name, param in models[0].named_parameters():
                chunks = clients[0].chunks(name)
                served = torch.cat([cluster.servers[c.server].shard.keys[c.key].param for c in chunks])  # type: ignore[misc]
                torch.testing.assert_close(param.detach().view(-1), served, atol=0, rtol=0, msg=name)
                torch.testing.assert_close(dict(models[1].named_parameters())[name], param, atol=0, rtol=0)
        finally:
            close_all(clients)


def test_the_jobs_optimizer_setting_refuses_a_script_that_builds_another() -> None:
    adam = describe_optimizer(torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3, betas=(0.8, 0.9)))
    check_job_optimizer(adam, "adam:lr=1e-3,betas=(0.8,0.9)")  # the same: accepted
    with pytest.raises(ValueError, match="builds SGD; build it with zps.worker.build_optimizer"):
        sgd = describe_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
        check_job_optimizer(sgd, "adam:lr=1e-3")
    with pytest.raises(ValueError, match="has lr=0.001"):
        check_job_optimizer(adam, "adam:lr=0.01")
    with local_cluster(1, 1, "bsp", optimizer="adam:lr=0.01") as cluster:
        (client,) = cluster.clients()
        try:
            model = _model()
            with pytest.raises(ValueError, match="ZPS_OPTIMIZER"):
                DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, client=client)
        finally:
            client.close()
