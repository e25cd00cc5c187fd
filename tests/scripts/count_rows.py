"""Exactly-once for table rows under failover: every worker pushes known integer gradient rows to a table (row-wise
SGD, lr 1, rows initially zero) and to dense tensors, waiting for each push's acknowledgement, so the final rows
are known exactly.

    zps run --mode asp --replicas 1 ... tests/scripts/count_rows.py --steps 40 --out final.safetensors

Step s of worker r pushes -(r + 1) to every element of rows ``IDS`` (each row += r + 1 per applied push): after every
worker's S steps each element holds S * (1 + 2 + ... + W). Worker 0 writes the rows and the dense tensors (after a
barrier) to ``--out``.
"""
import argparse

import torch
from safetensors.torch import save_file

from zps import worker

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--out", default="")
args = parser.parse_args()

client = worker.init()
IDS = torch.arange(300, dtype=torch.int64) * 7919 - 11  # spread over every server's rows
table = worker.EmbeddingTable("counts", 4, optimizer="sgd:lr=1", init="zeros")
values = {f"dense{i}": torch.zeros(100) for i in range(6)}  # on every server (--kill counts their steps)
client.declare(values, ("SGD", [{"lr": 1.0}]))
for step in range(args.steps):
    grads = {name: torch.full((100,), -float(client.rank + 1)) for name in values}
    dense = client.push_pull(grads, values, step, lr=1.0)  # (first: a server killed at this step has table pushes
    rows = table.lookup(IDS)                                # of it in flight)
    (-(client.rank + 1) * rows.sum()).backward()
    table.synchronize()  # acknowledged: every live copy applied it
    dense.result()
    print(f"STEP {step + 1}", flush=True)
client.barrier("end")
client.pull(values, step=0).result()
if client.rank == 0 and args.out:
    save_file({"rows": table.rows(IDS).contiguous(), **values}, args.out)
    stats = client.stats()
    print(f"DUPLICATES {sum(s['tables']['counts']['duplicate_pushes'] + s['replica_duplicates'] for s in stats)}",
          flush=True)
worker.shutdown()
