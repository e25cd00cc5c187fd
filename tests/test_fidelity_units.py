"""The parts of DDP fidelity that need no cluster: hyper-parameter differences, spec and option checks, refusals by
name, the rank-order sum, a step's hyper-parameters on the servers' optimizers, the worker state a checkpoint
keeps, the sampler's resume, the wire readers of a coordinated step, and a traced model that still pickles."""
from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
import pytest
import torch

from zps.launcher.cli import main as cli_main
from zps.protocol.bodies import KeyStat, inspect_reply, read_commit, read_hp, read_inspect_reply
from zps.protocol.config import ConfigError, JobConfig
from zps.protocol.messages import ErrorCode, ProtocolError
from zps.protocol.optim_spec import check_optimizer_spec, describe_optimizer, hyperparameter_overrides
from zps.ps.consistency import make_consistency
from zps.ps.optim import build_optimizer, check_overrides
from zps.ps.store import KeyState, Optimizers
from zps.telemetry.trace import Tracer
from zps.worker import DistributedOptimizer, _iteration, _state
from zps.worker._progress import Progress
from zps.worker.data import ShardSampler
from zps.worker.local import LocalClient

pytestmark = pytest.mark.unit


# -- hyper-parameters ------------------------------------------------------------------------------------------
def test_only_hyperparameters_that_differ_from_the_declared_optimizer_are_sent() -> None:
    model = torch.nn.Linear(2, 2)
    groups: list[dict[str, Any]] = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.1}]
    opt = torch.optim.Adam(groups, lr=0.01)
    declared = describe_optimizer(opt)
    assert hyperparameter_overrides(declared, opt.param_groups) is None  # nothing changed: nothing sent
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.5], total_steps=10)  # cycles lr and beta1
    found = hyperparameter_overrides(declared, opt.param_groups)
    assert found is not None and len(found) == 2
    assert set(found[0]) == {"lr", "betas"} and found[0]["betas"][0] == opt.param_groups[0]["betas"][0]
    assert "max_lr" not in found[0] and "initial_lr" not in found[1]  # the scheduler's own entries are not sent
    opt.param_groups[1]["weight_decay"] = 0.5
    assert (hyperparameter_overrides(declared, opt.param_groups) or [{}, {}])[1]["weight_decay"] == 0.5
    del sched


def test_a_steps_hyperparameters_are_applied_as_torch_would_with_them() -> None:
    """The servers' optimizer built with Adam(lr=0.01), stepped with betas and lr a scheduler set: the same bits as
    torch's Adam stepped with those settings."""
    param = torch.randn(16)
    grads = [torch.randn(16) for _ in range(3)]
    expected = param.clone().requires_grad_()
    reference = torch.optim.Adam([expected], lr=0.01)
    optimizers = Optimizers()
    state = KeyState(key=0, numel=16)
    optimizers.add(state, param.clone(), lambda p: build_optimizer("Adam", {"lr": 0.01}, p))
    for i, grad in enumerate(grads):
        lr, betas = 0.001 * (i + 1), (0.8 + 0.05 * i, 0.99)
        hp: dict[str, Any] = {"lr": lr, "betas": list(betas)}
        reference.param_groups[0].update(lr=lr, betas=betas)
        expected.grad = grad.clone()
        reference.step()
        state.hp = hp
        optimizers.apply([(state, grad.clone())])
    assert state.param is not None and torch.equal(state.param, expected.detach()) and state.version == 3
    optimizers.apply([(state, None)])  # a step without a gradient: versioned, not stepped
    assert torch.equal(state.param, expected.detach()) and state.version == 4


@pytest.mark.parametrize(("hp", "words"), [({"lr": -1.0}, "lr must be"), ({"momentum": 0.9, "lrr": 1.0}, "'lrr'"),
                                           ({"betas": [0.9, 0.99]}, "'betas'"), ({"momentum": -1.0}, "refuses")])
def test_hyperparameters_sgd_would_refuse_are_refused_by_name(hp: dict, words: str) -> None:
    with pytest.raises(ProtocolError, match=words) as found:
        check_overrides(torch.optim.SGD, {"lr": 0.1, "momentum": 0.0}, hp)
    assert found.value.code is ErrorCode.BAD_OPTIMIZER


@pytest.mark.parametrize(("spec", "words"), [
    ("adam:lr=1e-3,betas=0.9", "betas must be 2 numbers"),
    ("adamw:lrr=1e-3", "unexpected keyword argument 'lrr'"),
    ("lbfgs:lr=1", "LBFGS cannot be stepped on the parameter servers: it re-evaluates the loss through a closure"),
    ("sgd:lr=1e999", "lr=inf is not a finite number"),
    ("sgd:lr=-1", "Invalid learning rate"),
])
def test_optimizer_specs_fail_at_start_naming_the_problem(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_optimizer_spec(spec)
    with pytest.raises(ConfigError, match="--optimizer"):
        JobConfig(optimizer=spec).check_specs()


def test_options_that_would_pass_silently_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):  # --mode ssp without --staleness: the command line says how far ahead
        cli_main(["run", "--servers", "1", "--workers", "1", "--mode", "ssp", "examples/digits.py"])
    assert "--mode ssp needs --staleness N" in capsys.readouterr().err
    JobConfig(mode="ssp", staleness=0)  # given: every worker waits for every other (tests/test_consistency.py)
    with pytest.raises(ConfigError, match=r"--error-feedback\) needs ZPS_CODEC"):
        JobConfig(error_feedback=True)
    JobConfig(mode="ssp", staleness=1)
    JobConfig(error_feedback=True, codec="topk:ratio=0.1")


@pytest.mark.parametrize(("build", "words"), [
    (lambda p: torch.optim.LBFGS(p), "LBFGS cannot be stepped"),
    (lambda p: torch.optim.Adafactor(p), "factored over whole rows and columns"),
    (lambda p: torch.optim.SparseAdam(p), "sparse gradients"),
    (lambda p: torch.optim.Rprop(p), "element-wise optimizers only"),
])
def test_optimizers_the_servers_cannot_run_are_refused_when_wrapped(build, words: str) -> None:
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=words):
        DistributedOptimizer(build(model.parameters()), model)


def test_add_param_group_after_wrapping_is_refused() -> None:
    model = torch.nn.Linear(2, 2)
    opt = DistributedOptimizer(torch.optim.SGD([model.weight], lr=0.1), model,
                               client=LocalClient())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="add_param_group after the DistributedOptimizer was built"):
        opt.add_param_group({"params": [model.bias]})


def test_a_sparse_embedding_is_refused_by_name() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="Embedding '0' has sparse=True"):
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)


# -- the rank-order sum (deterministic BSP) --------------------------------------------------------------------
def _aggregate(order: list[int], grads: dict[int, torch.Tensor | None]) -> torch.Tensor:
    """The step's average from pushes arriving in ``order`` (a tensor of NaN when no worker had a gradient)."""
    bsp = make_consistency("bsp", len(grads))
    state = KeyState(key=0, numel=grads[0].numel() if grads[0] is not None else 4)
    found = None
    for w in order:
        grad = grads[w]
        found = bsp.push(state, w, 0, None if grad is None else grad.clone(), None)
        if w != order[-1]:
            assert found is None
            assert len(state.waiting) <= len(grads)  # at most one held back per worker
    assert found is not None
    return found.grad if found.grad is not None else torch.tensor(float("nan"))


def test_a_steps_sum_has_the_same_bits_whatever_order_pushes_arrive_in() -> None:
    g = torch.Generator().manual_seed(3)
    grads: dict[int, torch.Tensor | None] = {w: torch.randn(1000, generator=g) * 10 ** (w - 2) for w in range(5)}
    g0, g1, g2, g3, g4 = (grads[w] for w in range(5))  # magnitudes that round
    assert g0 is not None and g1 is not None and g2 is not None and g3 is not None and g4 is not None
    expected = (((g0 + g1) + g2) + g3 + g4) / 5
    arrival = (g4 + g0 + g3 + g1 + g2) / 5
    assert not torch.equal(expected, arrival)  # float addition depends on the order: the point of the rule
    for _ in range(20):
        order = random.Random(_).sample(range(5), 5)
        assert torch.equal(_aggregate(order, grads), expected), order


def test_arrival_order_sums_follow_the_arrivals() -> None:
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(1000, generator=g) * 10 ** (w - 2) for w in range(3)]
    bsp = make_consistency("bsp", 3, bsp_sum="arrival")
    state = KeyState(key=0, numel=1000)
    for w in (2, 0):
        assert bsp.push(state, w, 0, grads[w].clone(), None) is None and not state.waiting  # nothing held back
    found = bsp.push(state, 1, 0, grads[1].clone(), None)
    assert found is not None and found.grad is not None
    assert torch.equal(found.grad, ((grads[2] + grads[0]) + grads[1]) / 3)


def test_workers_without_a_gradient_count_as_zeros_and_none_at_all_steps_nothing() -> None:
    grads: dict[int, torch.Tensor | None] = {0: torch.ones(4), 1: None, 2: 3 * torch.ones(4)}
    assert torch.equal(_aggregate([2, 1, 0], grads), torch.full((4,), 4 / 3))  # (1 + 0 + 3) / 3, as DDP
    assert _aggregate([1, 0, 2], {0: None, 1: None, 2: None}).isnan().all()  # no worker had one: not stepped


def test_a_worker_that_leaves_mid_step_completes_it_with_what_it_pushed() -> None:
    bsp = make_consistency("bsp", 3)
    state = KeyState(key=0, numel=2)
    assert bsp.push(state, 2, 0, torch.full((2,), 3.0), None) is None  # before ranks 0 and 1: held back
    assert bsp.push(state, 0, 0, torch.ones(2), None) is None
    (done,) = bsp.leave(1, [state])  # rank 1 failed before it pushed: the step completes without it
    assert done[1].grad is not None and torch.equal(done[1].grad, torch.full((2,), 2.0))  # (1 + 3) / 2


# -- the worker state a checkpoint keeps --------------------------------------------------------------------
def test_param_groups_round_trip_with_their_tuples() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    saved = _state.group_state(opt.param_groups)
    opt.param_groups[0].update(lr=1.0, betas=(0.1, 0.2), weight_decay=0.3)
    _state.restore_groups(opt.param_groups, saved)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["weight_decay"] == 0


def test_every_random_generator_a_script_draws_from_comes_back() -> None:
    meta, tensors = _state.rng_state()
    drawn = (torch.rand(3), random.random(), np.random.rand())
    _state.restore_rng(meta, tensors)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], again[0]) and drawn[1:] == again[1:]


def test_buffers_come_back_and_a_checkpoint_of_other_buffers_is_refused() -> None:
    model = torch.nn.BatchNorm1d(3)
    model(torch.randn(8, 3))
    saved = _state.buffers(model)
    model(torch.randn(8, 3))
    _state.restore_buffers(model, saved)
    assert model.running_mean is not None and model.num_batches_tracked is not None
    assert torch.equal(model.running_mean, saved["buffer.running_mean"]) and int(model.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="buffers"):
        _state.restore_buffers(torch.nn.BatchNorm1d(3, track_running_stats=False), saved)


def test_a_resumed_sampler_skips_done_epochs_and_continues_where_it_stopped() -> None:
    data = list(range(20))
    calls: list[int] = []
    _iteration.set_handler(lambda: calls.append(1))
    try:
        straight = ShardSampler(data, num_replicas=2, rank=1, seed=4)  # type: ignore[arg-type]
        order = {}
        for epoch in range(3):
            straight.set_epoch(epoch)
            order[epoch] = list(straight)
        assert len(calls) == 30  # every sample drawn marks an iteration's end
        resumed = ShardSampler(data, num_replicas=2, rank=1, seed=4)  # type: ignore[arg-type]
        resumed.resume_at = (1, 4)
        seen = {}
        for epoch in range(3):
            resumed.set_epoch(epoch)
            seen[epoch] = list(resumed)
        assert seen == {0: [], 1: order[1][4:], 2: order[2]}
        assert resumed.state() == {"epoch": 2, "position": 10, "seed": 4, "size": 10}
    finally:
        _iteration.set_handler(None)


# -- the wire of a coordinated step -------------------------------------------------------------------------
def test_the_readers_of_a_coordinated_step_refuse_what_is_malformed() -> None:
    assert read_commit({"step": 3, "skip": False, "mul": [0.5], "hp": [{"lr": 0.1}]}) == {
        "step": 3, "skip": False, "mul": [0.5], "hp": [{"lr": 0.1}]}
    bad: Any
    for bad in ({"step": -1}, {"step": 1, "skip": 1}, {"step": 1, "mul": [float("nan")]}, {"step": 1, "mul": [1] * 9},
                {"step": 1, "hp": [{"lr": float("inf")}]}, {"step": 1, "hp": [{"": 1}]}, [], {"step": "1"}):
        with pytest.raises(ProtocolError):
            read_commit(bad)
    assert read_hp(None) is None
    bad_hp: Any
    for bad_hp in ([], [{"lr": "x"}], [{"betas": [1] * 9}], [1], [{}] * 1025):
        with pytest.raises(ProtocolError):
            read_hp(bad_hp)
    stats = {3: KeyStat(1.5, True), 4: KeyStat(None, False)}
    assert read_inspect_reply(dict(inspect_reply(stats)), {3, 4}) == stats
    with pytest.raises(ProtocolError):
        read_inspect_reply(dict(inspect_reply(stats)), {3})
    with pytest.raises(ProtocolError):
        read_inspect_reply({"keys": [[3, "big", True]]}, {3})


def test_a_traced_model_can_still_be_saved_whole(tmp_path) -> None:
    """--trace hooks the model's forward; torch.save(model) (pickle) must still work, and the loaded model runs."""
    model = torch.nn.Linear(2, 2)
    progress = Progress(Tracer(str(tmp_path), "worker", 0))
    assert progress.watch(model, lambda: 0)
    model(torch.ones(1, 2))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded(torch.ones(1, 2)), model(torch.ones(1, 2)))
