"""Train an MLP on scikit-learn's bundled handwritten digits with zps (real data, no download).

    zps run --servers 2 --workers 2 --mode bsp examples/digits.py --epochs 20 --out result.json

Each worker trains on its own shard of the training set; the servers hold the model and apply the optimizer.
Rank 0 evaluates on the held-out test set and writes the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zps import worker


def load_data(seed: int) -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def example_batch(n: int = 32) -> tuple[torch.Tensor, torch.Tensor, object]:
    """One step's inputs, targets and loss (``zps plan`` times the model on it)."""
    return torch.rand(n, 64), torch.randint(0, 10, (n,)), nn.CrossEntropyLoss()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in data.tensors)
    return (model(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where gradients are computed (default: cuda when available)",
    )
    parser.add_argument("--out", help="write a JSON summary here (rank 0)")
    args = parser.parse_args()

    client = worker.init()
    torch.manual_seed(args.seed)  # every worker builds the same model; rank 0's values initialise the servers
    train, test = load_data(args.seed)
    model = make_model().to(args.device)
    # the job's --optimizer when it sets one, else SGD with momentum
    optimizer = worker.DistributedOptimizer(
        worker.build_optimizer(model.parameters(), "sgd:lr=0.05,momentum=0.9"), model
    )
    sampler = worker.shard_sampler(train, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler)
    loss_fn = nn.CrossEntropyLoss()
    started = time.monotonic()
    # BSP needs every worker to take the same number of steps (as DDP does): the job's length is counted in the
    # steps of the workers it started with; a worker that joined later (--max-workers) has a smaller shard and goes
    # round it more often
    per_epoch = math.ceil(math.ceil(len(train) / client.config.job.num_workers) / args.batch_size)
    steps = args.epochs * per_epoch
    # 0 on a fresh start; resumed from a checkpoint (--resume), replacing a worker that failed (--on-worker-failure
    # restart) or joining (--max-workers), the job is further along: carry on from that step's place in the data
    epoch, skip = divmod(optimizer.steps, len(loader))
    while optimizer.steps < steps:
        sampler.set_epoch(epoch)
        total, batches = 0.0, 0
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            if optimizer.steps >= steps:
                break
            x, y = x.to(args.device), y.to(args.device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
            worker.report(loss=loss.item(), samples=len(y))  # the launcher's live view, zps top, the metrics
        skip = 0
        if client.rank == 0:  # this worker's copy (in ASP/SSP it trails the servers' model)
            acc = accuracy(model, test)
            worker.report(accuracy=acc)  # zps experiment's time to target accuracy, --metrics-out, zps top
            if epoch % 5 == 4:
                print(f"epoch {epoch + 1}/{args.epochs} loss {total / max(1, batches):.4f} test accuracy {acc:.4f}",
                      flush=True)
        epoch += 1
    wall = time.monotonic() - started
    optimizer.synchronize()  # every worker now holds the servers' model (in ASP/SSP its own copy trailed it)
    stats = client.stats()
    if client.rank == 0:
        acc = accuracy(model, test)  # of the servers' model, after synchronize()
        worker.report(accuracy=acc)
        summary = {
            "test_accuracy": acc,
            "steps": optimizer.steps,
            "mode": client.topology.mode,
            "staleness": client.topology.staleness,
            "workers": client.num_workers,
            "servers": client.topology.num_servers,
            "wall_seconds": wall,
            "max_served_gap": max((s["max_served_gap"] for s in stats), default=0),
        }
        print(json.dumps(summary), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=2)
    worker.shutdown()


if __name__ == "__main__":
    main()
