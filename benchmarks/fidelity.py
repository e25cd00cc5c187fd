"""What DDP fidelity costs a worker's step when a script uses none of it, and what clipping with DDP's meaning adds.

    python benchmarks/fidelity.py [--json out.json]

Unused machinery, measured on the CPU time of one process (load on other cores barely moves it), for the
transformer LM of examples/lm.py (134 tensors) and the MLP of benchmarks/training.py (6 tensors):

- the gradient hooks every parameter now carries (they record each gradient and its version, for "changed after
  backward" and for overlap): their Python, one call per parameter (a backward timed with and without them differs
  by less than its own noise);
- the per-step Python of ``step()``: the hyper-parameter differences (``hyperparameter_overrides``) and the check of
  gradients changed after backward, each timed alone.

Both are reported against the step time of a plain single-process step of the same model (forward, backward,
torch.optim) measured in the same run. Clipping's end-to-end cost is benchmarks/training.py ``--fidelity``
(``zps (S=2, ... clip)`` against ``zps (S=2, ...)``); this script reports the bytes of its one extra exchange (the
INSPECT and its reply) for the LM's keys.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from benchmarks.training import make_batches, make_model, set_threads  # noqa: E402


def cpu_per_call(fn, repeats: int) -> float:
    """Median process CPU seconds of one call of ``fn`` over ``repeats`` calls (after a warm-up call)."""
    return statistics.median(C.time_calls(fn, repeats, clock=time.process_time))


def measure(kind: str, repeats: int) -> dict[str, float]:
    import torch

    from zps.protocol.bodies import KeyStat, inspect_reply
    from zps.protocol.messages import Kind, Message
    from zps.protocol.optim_spec import describe_optimizer, hyperparameter_overrides
    from zps.protocol.plan import ParamSpec, make_plan

    set_threads(1)
    model = make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = make_batches(kind, 8 if kind == "lm" else 64, seed=1)
    from benchmarks.training import loss_of

    def step() -> None:
        x, y = batches[0]
        opt.zero_grad()
        loss_of(model(x), y).backward()
        opt.step()

    def backward() -> None:
        x, y = batches[0]
        opt.zero_grad()
        loss_of(model(x), y).backward()

    plain_step = cpu_per_call(step, repeats)
    backward()
    seen: dict[int, tuple[torch.Tensor, int]] = {}

    def hook(param: torch.Tensor) -> None:  # what DistributedOptimizer._on_grad_ready does without overlap
        grad = param.grad
        if grad is not None:
            seen[id(param)] = (grad, grad._version)

    every = list(model.parameters())

    def all_hooks() -> None:  # one call per parameter per backward
        for p in every:
            hook(p)

    hooks = cpu_per_call(all_hooks, repeats * 20)
    declared = describe_optimizer(opt)
    overrides = cpu_per_call(lambda: hyperparameter_overrides(declared, opt.param_groups), repeats * 20)
    params = dict(model.named_parameters())

    def changed() -> dict[str, int]:  # DistributedOptimizer._changed_after_backward
        out = {}
        for name, p in params.items():
            found = seen.get(id(p))
            if found is not None and (p.grad is not found[0] or p.grad._version != found[1]):
                out[name] = 1
        return out

    check = cpu_per_call(changed, repeats * 20)
    plan = make_plan([ParamSpec(n, tuple(p.shape), 4) for n, p in params.items()], 2)
    asked = Message(Kind.INSPECT, src="worker:0", keys=[{"key": c.key, "step": 7, "nf": 0} for c in plan.chunks],
                    body={"norm": 2.0})
    answer = Message(Kind.OK, src="server:0", body=dict(inspect_reply({c.key: KeyStat(1.25, True)
                                                                        for c in plan.chunks})))
    return {"tensors": len(params), "plain_step_ms": plain_step * 1e3,
            "hooks_us": hooks * 1e6, "overrides_us": overrides * 1e6,
            "changed_check_us": check * 1e6,
            "inspect_bytes": sum(len(f) for f in asked.to_frames()) + sum(len(f) for f in answer.to_frames())}


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    started, load_before = time.monotonic(), C.load_avg()
    rows, results = [], {}
    for kind in ("mlp", "lm"):
        r = results[kind] = measure(kind, args.repeats)
        unused = r["hooks_us"] + r["overrides_us"] + r["changed_check_us"]
        rows.append([kind, str(r["tensors"]), f"{r['plain_step_ms']:.1f}", f"{r['hooks_us']:.0f}",
                     f"{r['overrides_us']:.1f}", f"{r['changed_check_us']:.1f}",
                     f"{100 * unused / 1e3 / r['plain_step_ms']:.2f}%", str(r["inspect_bytes"])])
    table = C.md_table(["model", "tensors", "plain step, CPU ms", "gradient hooks, CPU us/step",
                        "hyper-parameter differences, us/step", "changed-after-backward check, us/step",
                        "unused machinery / step", "INSPECT + reply, bytes (S=2)"], rows)
    C.finish("fidelity: what an unused fidelity machinery costs a step", table, results, args.json, started,
             load_before)


if __name__ == "__main__":
    main()
