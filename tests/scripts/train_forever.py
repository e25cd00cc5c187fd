"""A worker that trains until it is killed (or, with --crash-rank R --crash-after N, rank R fails after N steps:
``--crash-how exit`` exits with code 3, ``raise`` raises RuntimeError)."""

import argparse
import sys

import torch

from zps import worker

parser = argparse.ArgumentParser()
parser.add_argument("--crash-rank", type=int, default=-1)
parser.add_argument("--crash-after", type=int, default=3)
parser.add_argument("--crash-how", choices=["exit", "raise"], default="exit")
args = parser.parse_args()

client = worker.init()
model = torch.nn.Linear(8, 2)
opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model)
step = 0
while True:
    opt.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    opt.step()
    step += 1
    if step == 2:
        print("TRAINING", flush=True)
    if client.rank == args.crash_rank and step == args.crash_after:
        print("crashing on purpose", flush=True)
        if args.crash_how == "raise":
            raise RuntimeError("a bug in the training script")
        sys.exit(3)
