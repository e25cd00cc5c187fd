"""A small transformer language model trained with zps on Python's own standard-library sources (nothing to download).

    zps run --servers 2 --workers 4 --mode bsp examples/lm.py --steps 200
    zps run --servers 2 --workers 4 --net "bw=100mbit,latency=1ms" --codec topk:ratio=0.01 --error-feedback \
        --pull-codec topk:ratio=0.01 examples/lm.py

A byte-level GPT (vocabulary 256): 8 pre-norm blocks of width 160 with 4 heads, learned positions; 2.6M parameters in
134 tensors, so per-key costs and communication show. The text: the standard library's ``*.py`` files in sorted
order, the first ``--text-bytes`` of them; the last 5% is held out. Each worker draws windows from its own slice of
the rest. Rank 0 measures next-byte accuracy on a fixed held-out set every ``--eval-every`` steps and reports it
(``zps.worker.report(accuracy=...)``: the live view, ``--metrics-out`` and ``zps experiment``'s time to target).
``make_model()``, ``load_text()`` and ``example_batch()`` build the same model, text and a step's batch anywhere
(benchmarks, ``zps plan``).

What the accuracy means (the default 4 MiB of Python 3.11's library): always guessing a space scores 0.30 on the
held-out text, the best bigram table 0.41; 4 workers x 2 servers (BSP, 8 windows per worker) reached 0.40 at step 25,
0.53 at step 200 and 0.61 at step 300 (1.1-1.2 s a step on this shared 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256
WIDTH, DEPTH, HEADS, CONTEXT = 160, 8, 4, 64
HELD_OUT = 0.05
SKIPPED_FOLDERS = frozenset({"site-packages", "dist-packages", "test", "__pycache__"})


def stdlib_files() -> list[Path]:
    """The standard library's Python sources in sorted order; installed packages (site-packages) and the
    library's own test suite (test/) left out, and not walked (the walk is most of the time otherwise)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED_FOLDERS]
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def load_text(limit: int = 4 << 20) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's sources, as a uint8 tensor."""
    chunks, size = [], 0
    for path in stdlib_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        q, k, v = (proj(h).view(b, t, HEADS, WIDTH // HEADS).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(b, t, WIDTH))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ByteGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.zeros(CONTEXT, WIDTH))
        self.blocks = nn.Sequential(*(Block() for _ in range(DEPTH)))
        self.ln = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.ln(self.blocks(x)))


def make_model() -> nn.Module:
    model = ByteGPT()
    nn.init.normal_(model.position, std=0.02)
    return model


def example_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor, object]:
    """One step's inputs, targets and loss of ``n`` random windows (``zps plan`` times the model on it)."""
    text = torch.randint(0, VOCAB, (n * (CONTEXT + 1) + 1,), dtype=torch.uint8)
    x, y = windows(text, torch.arange(n) * (CONTEXT + 1))
    return x, y, lambda logits, target: F.cross_entropy(logits.flatten(0, 1), target.flatten())


def windows(text: torch.Tensor, starts: torch.Tensor, length: int = CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets of the ``length``-byte windows beginning at ``starts``."""
    idx = starts[:, None] + torch.arange(length + 1)
    seq = text[idx].long()
    return seq[:, :-1], seq[:, 1:]


def split(text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(text) * (1 - HELD_OUT))
    return text[:cut], text[cut:]


@torch.no_grad()
def accuracy(
    model: nn.Module, held_out: torch.Tensor, batches: int = 4, batch: int = 16, length: int = CONTEXT
) -> float:
    """Next-byte accuracy on fixed held-out windows (the same on every call), every position counted."""
    gen = torch.Generator().manual_seed(1234)
    starts = torch.randint(0, len(held_out) - length - 1, (batches * batch,), generator=gen)
    right = total = 0
    for part in starts.split(batch):
        x, y = windows(held_out, part.to(held_out.device), length)
        right += (model(x).argmax(-1) == y).sum().item()
        total += y.numel()
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8, help="windows per worker per step")
    parser.add_argument("--seq-len", type=int, default=CONTEXT, help=f"bytes per window (at most {CONTEXT})")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--text-bytes", type=int, default=4 << 20)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write a JSON summary here (rank 0)")
    args = parser.parse_args()
    if not 1 <= args.seq_len <= CONTEXT:
        parser.error(f"--seq-len must be 1..{CONTEXT} (the model's positions)")

    from zps import worker

    torch.set_num_threads(args.threads)
    client = worker.init()
    torch.manual_seed(args.seed)  # every worker builds the same model; rank 0's values initialise the servers
    model = make_model().to(args.device)
    train, held_out = split(load_text(args.text_bytes))
    shard = len(train) // client.num_workers
    mine = train[client.rank * shard : (client.rank + 1) * shard]
    if client.rank == 0:
        tensors = list(model.parameters())
        print(f"model: {sum(p.numel() for p in tensors):,} parameters in {len(tensors)} tensors; text: "
              f"{len(train):,} bytes to train on, {len(held_out):,} held out", flush=True)
    optimizer = worker.DistributedOptimizer(worker.build_optimizer(model.parameters(), f"adam:lr={args.lr}"), model)
    gen = torch.Generator().manual_seed(args.seed * 1000 + client.rank)
    started = time.monotonic()
    curve: list[list[float]] = []  # [step, seconds since start, accuracy] of rank 0's evaluations
    loss = torch.tensor(float("nan"))
    for step in range(optimizer.steps, args.steps):
        starts = torch.randint(0, len(mine) - args.seq_len - 1, (args.batch_size,), generator=gen)
        x, y = windows(mine, starts, args.seq_len)
        x, y = x.to(args.device), y.to(args.device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        worker.report(loss=loss.item(), samples=len(x))
        if client.rank == 0 and (step + 1) % args.eval_every == 0:
            # this worker's copy (in ASP/SSP it trails the servers')
            acc = accuracy(model, held_out.to(args.device), length=args.seq_len)
            worker.report(accuracy=acc)
            curve.append([step + 1, round(time.monotonic() - started, 3), round(acc, 4)])
            print(f"step {step + 1} loss {loss.item():.3f} held-out next-byte accuracy {acc:.4f}", flush=True)
    wall = time.monotonic() - started
    optimizer.synchronize()
    if client.rank == 0:
        acc = accuracy(model, held_out.to(args.device), length=args.seq_len)  # the servers' model
        worker.report(accuracy=acc)
        summary = {"accuracy": acc, "steps": optimizer.steps, "wall_seconds": wall,
                   "perplexity_hint": math.exp(loss.item()), "workers": client.num_workers,
                   "servers": client.topology.num_servers, "mode": client.topology.mode, "curve": curve}
        print(json.dumps(summary), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2))
    worker.shutdown()


if __name__ == "__main__":
    main()
