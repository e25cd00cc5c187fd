"""A DLRM-like click model with its embedding table on the parameter servers (synthetic data, nothing downloaded).

    zps run --servers 2 --workers 2 examples/ctr.py --out ctr.json
    python examples/ctr.py --baseline          # one process, nn.EmbeddingBag(sparse=True) holding the whole table

Each sample has 13 dense features and 26 categorical ones, as Criteo's click logs do: each categorical feature
draws its value from a Zipf distribution over its own vocabulary (Criteo's cardinalities, scaled by
``--vocab-scale``), and the value's id is a 64-bit hash of (feature, value), as recommenders hash their features.
The click is drawn from a hidden model (a weight per dense feature, an effect per categorical value), so what a
model can learn is what its data shows it: frequent values, not the rare ones. The data of every step and worker
is generated from (seed, step, worker): a resumed or replayed job sees exactly the same batches.

The model is DLRM's: a bottom MLP over the dense features, one 16-wide row per categorical id from one
:class:`zps.worker.EmbeddingTable` (the servers hold the rows; a worker pulls only the rows of its batch), the
pairwise dot products of the 27 vectors, a top MLP. The dense parameters are a DistributedOptimizer's (Adam); the
table's rows take Adagrad on the servers. Rank 0 evaluates the AUC on held-out samples and writes ``--out``: the
JSON summary with ``auc``, ``rows`` (the table's rows held on the servers), ``dim``, ``worker_rss_bytes`` (the
largest peak RSS of any worker), samples/s and the table's bytes on the wire per sample.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zps import worker
from zps.protocol.tables import mix64

# Criteo Kaggle's 26 categorical cardinalities (the table's vocabulary is their sum times --vocab-scale)
CARDINALITIES = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
DENSE, SPARSE, DIM = 13, len(CARDINALITIES), 16


class Data:
    """The synthetic click logs: batches as a function of (seed, step, worker); ``vocab``: values per feature."""

    def __init__(self, seed: int, vocab_scale: float, zipf: float, zipf_large: float) -> None:
        self.seed, self.zipf, self.zipf_large = seed, zipf, zipf_large
        self.vocab = [max(2, int(c * vocab_scale)) if c > 1000 else c for c in CARDINALITIES]
        self.offsets = np.cumsum([0, *self.vocab[:-1]])  # --baseline: a feature's values are rows offset..+vocab
        g = torch.Generator().manual_seed(seed)
        self.dense_weight = torch.randn(DENSE, generator=g) * 0.5

    @property
    def rows(self) -> int:
        return int(sum(self.vocab))

    def batch(self, size: int, step: int, rank: int, stream: int = 0) -> dict[str, torch.Tensor]:
        """``size`` samples: dense features, the categorical values' ids (64-bit hashes), their rows for a table
        held whole (``baseline``), and the clicks."""
        rng = np.random.default_rng([self.seed, stream, step, rank])
        dense = rng.standard_normal((size, DENSE), dtype=np.float32)
        u = rng.random((size, SPARSE))
        values = np.empty((size, SPARSE), dtype=np.int64)
        for f, n in enumerate(self.vocab):  # a Zipf rank in [0, n) by the inverse CDF of its density
            a = 1.0 - (self.zipf if CARDINALITIES[f] < 1_000_000 else self.zipf_large)
            values[:, f] = np.minimum(n - 1, ((n ** a - 1.0) * u[:, f] + 1.0) ** (1.0 / a) - 1.0).astype(np.int64)
        feature = np.arange(SPARSE, dtype=np.uint64)[None, :]
        hashed = mix64((values.astype(np.uint64) << np.uint64(8)) ^ feature ^ np.uint64(self.seed << 40))
        ids = hashed.view(np.int64)
        effect = (mix64(hashed ^ np.uint64(0xC0FFEE)) >> np.uint64(11)).astype(np.float64) / (1 << 53) * 2 - 1
        logit = dense @ self.dense_weight.numpy() + 2.5 * effect.sum(axis=1) / math.sqrt(SPARSE) - 1.0
        clicks = rng.random(size) < 1.0 / (1.0 + np.exp(-logit))
        return {"dense": torch.from_numpy(dense), "ids": torch.from_numpy(ids.copy()),
                "rows": torch.from_numpy(values + self.offsets[None, :]),
                "y": torch.from_numpy(clicks.astype(np.float32))}


class DLRM(nn.Module):
    """Bottom MLP, embeddings, pairwise dot products, top MLP. ``table``: an EmbeddingTable (its ``lookup``), or an
    nn.EmbeddingBag held whole (--baseline), indexed by rows."""

    def __init__(self, table: nn.Module) -> None:
        super().__init__()
        self.table = table
        self.bottom = nn.Sequential(nn.Linear(DENSE, 64), nn.ReLU(), nn.Linear(64, DIM), nn.ReLU())
        pairs = (SPARSE + 1) * SPARSE // 2
        self.top = nn.Sequential(nn.Linear(pairs + DIM, 64), nn.ReLU(), nn.Linear(64, 1))
        self._upper = torch.triu_indices(SPARSE + 1, SPARSE + 1, offset=1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.table, worker.EmbeddingTable):
            return self.table.lookup(ids)
        return self.table(ids.reshape(-1, 1)).view(*ids.shape, DIM)  # one id per bag: its row

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)
        vectors = torch.cat([bottom.unsqueeze(1), self.embed(ids)], dim=1)  # (B, 27, DIM)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))[:, self._upper[0], self._upper[1]]
        return self.top(torch.cat([bottom, dots], dim=1)).squeeze(1)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The area under the ROC curve (Mann-Whitney U, ties counted half)."""
    order = torch.argsort(scores)
    s, y = scores[order], labels[order].bool()
    ranks = torch.empty_like(s, dtype=torch.float64)
    ranks[:] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    ranks = ((ends - counts.to(torch.float64) + 1 + ends) / 2)[inverse]
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per worker")
    parser.add_argument("--batch-size", type=int, default=2048, help="per worker")
    parser.add_argument("--vocab-scale", type=float, default=0.35, help="of Criteo's cardinalities (0.35: 11.8M)")
    parser.add_argument("--zipf", type=float, default=1.1, help="the exponent of the values' Zipf distribution")
    parser.add_argument("--zipf-large", type=float, default=0.5, help="the exponent of the features of a million "
                        "values or more (user and item ids: long tails, most values rare)")
    parser.add_argument("--lr", type=float, default=0.05, help="the table's Adagrad learning rate")
    parser.add_argument("--dense-lr", type=float, default=2e-3)
    parser.add_argument("--optimizer", default="", help="the table's optimizer spec (default adagrad:lr=LR)")
    parser.add_argument("--codec", default="none", help="rows on the wire: none, fp16, int8")
    parser.add_argument("--sync", default="", help="'async': the table's pushes applied as they come")
    parser.add_argument("--no-prefetch", action="store_true")
    parser.add_argument("--eval-samples", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline", action="store_true", help="one process, nn.EmbeddingBag(sparse=True) holding "
                                                                "the whole table, torch.optim.Adagrad")
    parser.add_argument("--out", help="write the JSON summary here (rank 0)")
    args = parser.parse_args()

    data = Data(args.seed, args.vocab_scale, args.zipf, args.zipf_large)
    client: Any = None if args.baseline else worker.init()
    rank, workers = (0, 1) if args.baseline else (client.rank, client.num_workers)
    torch.manual_seed(args.seed)  # every worker builds the same dense model; rank 0's values initialise the servers
    table: nn.Module
    if args.baseline:
        table = nn.EmbeddingBag(data.rows, DIM, mode="sum", sparse=True)
        with torch.no_grad():
            table.weight.uniform_(-1 / math.sqrt(DIM), 1 / math.sqrt(DIM))
    else:
        table = worker.EmbeddingTable("categorical", DIM, mode="sum", codec=args.codec, sync=args.sync,
                                      optimizer=args.optimizer or f"adagrad:lr={args.lr}")
    model = DLRM(table)
    if args.baseline:
        dense_params = [p for n, p in model.named_parameters() if not n.startswith("table.")]
        opt: torch.optim.Optimizer = torch.optim.Adam(dense_params, lr=args.dense_lr)
        table_opt = torch.optim.Adagrad(table.parameters(), lr=args.lr)
    else:  # an EmbeddingTable has no parameters: the model goes to the DistributedOptimizer as it is
        opt = worker.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=args.dense_lr), model)
    loss_fn = nn.BCEWithLogitsLoss()
    start = opt.steps if isinstance(opt, worker.DistributedOptimizer) else 0
    batches: Iterator[dict[str, torch.Tensor]] = (data.batch(args.batch_size, step, rank)
                                                  for step in range(start, args.steps))
    if isinstance(table, worker.EmbeddingTable) and not args.no_prefetch:
        batches = worker.prefetching(batches, lambda b: {table: b["ids"]})
    began, losses = time.monotonic(), []
    for step, batch in enumerate(batches, start):
        opt.zero_grad()
        ids = batch["rows"] if args.baseline else batch["ids"]
        loss = loss_fn(model(batch["dense"], ids), batch["y"])
        loss.backward()
        opt.step()
        if args.baseline:
            table_opt.step()
            table_opt.zero_grad()
        losses.append(loss.item())
        if not args.baseline:
            worker.report(loss=losses[-1], samples=args.batch_size)
        if rank == 0 and (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps} loss {sum(losses[-100:]) / len(losses[-100:]):.4f}", flush=True)
    wall = time.monotonic() - began
    trained = args.steps - start
    if isinstance(opt, worker.DistributedOptimizer):
        table.synchronize()  # type: ignore[operator]
        opt.synchronize()
    summary: dict[str, Any] = {}
    if rank == 0:
        model.eval()
        with torch.no_grad():
            scores, labels = [], []
            for i in range(math.ceil(args.eval_samples / 4096)):
                b = data.batch(4096, i, 0, stream=1)
                scores.append(model(b["dense"], b["rows"] if args.baseline else b["ids"]))
                labels.append(b["y"])
        summary["auc"] = auc(torch.cat(scores), torch.cat(labels))
    rss = _largest_rss(client, args.out, rank, workers)
    if rank == 0:
        if args.baseline:
            rows, wire = data.rows, None
        else:
            stats = table.stats()  # type: ignore[operator]
            rows = sum(s["rows"] for s in stats)
            moved = sum(s["bytes_pulled"] + s["bytes_pushed"] for s in stats)
            wire = moved / (trained * args.batch_size * workers)
        summary.update({
            "rows": rows, "dim": DIM, "vocabulary": data.rows, "worker_rss_bytes": rss,
            "table_bytes": rows * DIM * 4, "steps": args.steps, "workers": workers,
            "servers": getattr(getattr(client, "topology", None), "num_servers", 0),
            "mode": getattr(getattr(client, "topology", None), "mode", "local"), "batch_size": args.batch_size,
            "samples_per_second": trained * args.batch_size * workers / wall, "wall_seconds": wall,
            "table_wire_bytes_per_sample": wire, "dense_table_bytes_per_sample": 2 * data.rows * DIM * 4 / (
                args.batch_size * workers),
            "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        })
        print(json.dumps(summary), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2))
    if not args.baseline:
        worker.shutdown()


def _largest_rss(client: Any, out: str | None, rank: int, workers: int) -> int:
    """The largest peak RSS of any worker: each writes its own beside ``--out`` (the job's workers share a
    directory on one host), rank 0 reads them after a barrier."""
    mine = peak_rss()
    if client is None or workers == 1:
        return mine
    where = Path(out or "ctr.json").with_suffix(f".rss-{rank}")
    where.write_text(str(mine))
    worker.barrier("ctr-rss")
    if rank != 0:
        return mine
    found = [mine]
    for r in range(1, workers):
        other = where.with_suffix(f".rss-{r}")
        found.append(int(other.read_text()))
        os.unlink(other)
    os.unlink(where)
    return max(found)


if __name__ == "__main__":
    main()
