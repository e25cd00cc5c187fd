"""Deterministic training with an embedding table for the table durability tests: each step's batch is a function
of (step, rank) only, so a resumed job sees exactly the data the uninterrupted one did.

    zps run ... tests/scripts/table_steps.py --steps 30 --out final.safetensors [--pause-after 15]

``--pause-after N``: worker 0 stops after N steps and waits to be killed. ``--out``: worker 0 writes the dense
parameters and the rows of every id the job can draw (after synchronize) there. ``--optimizer``: the table's.
"""
import argparse
import threading

import torch
from safetensors.torch import save_file

from zps import worker

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--pause-after", type=int, default=0)
parser.add_argument("--optimizer", default="adam:lr=0.05")
parser.add_argument("--out", default="")
args = parser.parse_args()
VOCAB = 3000

client = worker.init()
torch.manual_seed(0)
head = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
table = worker.EmbeddingTable("emb", 8, mode="sum", optimizer=args.optimizer)
opt = worker.DistributedOptimizer(worker.build_optimizer(head.parameters(), "adam:lr=0.01"), head)
assert table.step == opt.steps, (table.step, opt.steps)
if opt.steps:
    print(f"RESUMED at step {opt.steps}: table at step {table.step}", flush=True)
zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
while opt.steps < args.steps:
    g = torch.Generator().manual_seed(1000 * opt.steps + client.rank)
    ids = torch.multinomial(zipf, 64, replacement=True, generator=g).view(16, 4) * 104729 - 7
    y = torch.randn(16, 1, generator=g)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(head(table(ids)), y)
    loss.backward()
    opt.step()
    print(f"STEP {opt.steps}", flush=True)
    if client.rank == 0 and opt.steps == args.pause_after:
        print("PAUSED", flush=True)
        threading.Event().wait()  # until the test kills the job
table.synchronize()
opt.synchronize()
if client.rank == 0 and args.out:
    every = torch.arange(VOCAB) * 104729 - 7
    save_file({**{n: p.detach().contiguous() for n, p in head.named_parameters()}, "table": table.rows(every)},
              args.out)
worker.shutdown()
