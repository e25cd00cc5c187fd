"""Exactly-once under failover: every worker pushes known integer gradients to six tensors spread over the servers
(server SGD, lr 1), waiting for each push's acknowledgement, so the final values are known exactly.

    zps run --mode asp ... tests/scripts/count_pushes.py --steps 60 --out final.safetensors

Step s of worker r pushes -(r + 1) to every element (w += r + 1 per applied push): after every worker's S steps each
element holds S * (1 + 2 + ... + W). Worker 0 writes the final values (after a barrier and a pull) to ``--out``.
"""
import argparse

import torch
from safetensors.torch import save_file

from zps import worker

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=60)
parser.add_argument("--out", default="")
args = parser.parse_args()

client = worker.init()
values = {f"t{i}": torch.zeros(1000) for i in range(6)}
client.declare(values, ("SGD", [{"lr": 1.0}]))
for step in range(args.steps):
    grads = {name: torch.full((1000,), -float(client.rank + 1)) for name in values}
    client.push_pull(grads, values, step, lr=1.0).result()
    print(f"STEP {step + 1}", flush=True)
client.barrier("end")
client.pull(values, step=0).result()
if client.rank == 0 and args.out:
    save_file(values, args.out)
    stats = client.stats()  # the live servers': pushes a copy had applied already, answered and not applied again
    print(f"DUPLICATES {sum(s['duplicates'] + s['replica_duplicates'] for s in stats)}", flush=True)
worker.shutdown()
