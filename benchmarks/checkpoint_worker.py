"""The worker of benchmarks/checkpoint.py's throughput measure: the MLP of benchmarks/training.py, trained with a
DistributedOptimizer (Adam) for a fixed wall time; worker 0 reports steps per second."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks.training import PER_WORKER, make_batches, make_model, set_threads  # noqa: E402
from zps import worker  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    set_threads(1)
    client = worker.init()
    model = make_model("mlp")
    opt = worker.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, overlap=False)
    batches = make_batches("mlp", PER_WORKER["mlp"], seed=1 + client.rank)
    client.barrier("start")
    started = time.monotonic()
    while time.monotonic() - started < args.seconds:
        x, y = batches[opt.steps % len(batches)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    elapsed = time.monotonic() - started
    if client.rank == 0:
        C.emit_result({"steps_per_second": opt.steps / elapsed, "steps": opt.steps})
    worker.shutdown()


if __name__ == "__main__":
    main()
