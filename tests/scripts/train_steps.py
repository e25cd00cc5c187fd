"""Deterministic training for the durability tests: each step's batch is a function of (step, rank) only, so a
resumed job sees exactly the data the uninterrupted one did.

    zps run ... tests/scripts/train_steps.py --steps 60 --out final.safetensors [--pause-after 25] [--wide 4]

Prints "STEP n" after each step (``--step-times``: and "STEPTIME n SECONDS", its wall time). ``--pause-after N``:
worker 0 stops after N steps and waits to be killed. ``--step-time S``: each step emulates S seconds of compute
(``--slow-rank R --slow-factor F``: rank R takes F times that: a straggler). ``--out``: worker 0 writes the final
parameters (after synchronize) there. The script's own state (a marker and an RNG state) goes with every
checkpoint; a resumed job prints what it got back.
"""
import argparse
import threading
import time

import torch
from safetensors.torch import save_file

from zps import worker

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--pause-after", type=int, default=0)
parser.add_argument("--wide", type=int, default=1, help="multiplies the hidden width (a bigger model)")
parser.add_argument("--out", default="")
parser.add_argument("--step-time", type=float, default=0.0, help="emulated compute per step, in seconds")
parser.add_argument("--slow-rank", type=int, default=-1, help="this rank's compute takes --slow-factor x longer")
parser.add_argument("--slow-factor", type=float, default=2.0)
parser.add_argument("--step-times", action="store_true", help="print 'STEPTIME n SECONDS' after each step")
args = parser.parse_args()

client = worker.init()
torch.manual_seed(0)
hidden = 32 * args.wide
model = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                            torch.nn.Tanh(), torch.nn.Linear(hidden, 4))
opt = worker.DistributedOptimizer(worker.build_optimizer(model.parameters(), "adam:lr=0.01"), model)
opt.on_checkpoint(lambda: {"marker": f"rank {client.rank} at step {opt.steps}", "rng": torch.get_rng_state()})
if opt.resumed is not None:
    print(f"RESUMED at step {opt.steps}: {opt.resumed['marker']}", flush=True)
began = time.perf_counter()
while opt.steps < args.steps:
    g = torch.Generator().manual_seed(1000 * opt.steps + client.rank)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if args.step_time:  # emulated work (a bigger model's compute), not synchronisation
        time.sleep(args.step_time * (args.slow_factor if client.rank == args.slow_rank else 1.0))
    opt.step()
    worker.report(loss=loss.item(), samples=len(x))
    print(f"STEP {opt.steps}", flush=True)
    if args.step_times:  # from the end of the previous step: compute, push, the wait for the servers, pull
        now = time.perf_counter()
        print(f"STEPTIME {opt.steps} {now - began:.4f}", flush=True)
        began = now
    if client.rank == 0 and opt.steps == args.pause_after:
        print("PAUSED", flush=True)
        threading.Event().wait()  # until the test kills the job
opt.synchronize()
if client.rank == 0 and args.out:
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, args.out)
worker.shutdown()
