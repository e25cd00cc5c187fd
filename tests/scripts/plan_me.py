"""A zps training script for zps plan's stand-in (tests/test_planner.py): two linear layers (50 + 5 + 10 + 2
parameters), SGD with momentum, 4 samples and 30 ms of emulated compute a step, for --steps steps."""
import argparse
import time

import torch

from zps import worker

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--no-optimizer", action="store_true", help="push nothing through a DistributedOptimizer")
args = parser.parse_args()
client = worker.init()
model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.Linear(5, 2))
if args.no_optimizer:
    print("nothing to plan", client.rank)
    raise SystemExit(0)
opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
assert isinstance(opt, worker.DistributedOptimizer)  # (as examples/ctr.py asks: the stand-in keeps the class)
for _ in range(args.steps):
    time.sleep(0.03)  # the step's compute
    opt.zero_grad()
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    worker.report(loss=0.0, samples=4)
worker.shutdown()
