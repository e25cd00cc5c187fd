"""``zps plan --table N:DIM``: what embedding tables add to a step (docs/embeddings.md).

A table's traffic is the distinct ids of a worker's batch times the row: each way, ``N * (8 + 4 * DIM)`` bytes per
worker (an id and a float32 row; a push carries a gradient row per id), spread over the servers by the ids' hash,
so a server receives ``W * N / S`` rows of every table each way (incast). A server's work per row (the index lookup,
the gather, the optimizer's update) is measured here on a table of a million rows (:func:`row_cost`). The rows are
pulled at the forward and pushed at the backward, apart from the dense parameters' traffic: in a step they add

    2 x (latency + message) + 2 x max(worker link, server link incast) + the busiest server's row work
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from zps.protocol.simulation import Link

Tables = tuple[tuple[int, int], ...]  # per table: (distinct ids in a worker's batch, dim)


def parse_table(text: str) -> tuple[int, int]:
    """``"4096:16"`` -> (4096, 16); ValueError naming what is wrong."""
    ids, _, dim = text.partition(":")
    try:
        found = int(ids), int(dim or 16)
    except ValueError:
        raise ValueError(f"--table {text!r}: expected IDS:DIM (distinct ids per worker batch, row width)") from None
    if found[0] < 0 or found[1] < 1:
        raise ValueError(f"--table {text!r}: ids must be >= 0 and dim >= 1")
    return found


def row_cost(dims: Sequence[int] = (16, 64), rows: int = 1 << 20, batch: int = 4096) -> tuple[float, float]:
    """A server's seconds per row pulled and pushed (a + b * dim), measured on this host with one torch thread."""
    import torch

    from zps.protocol.rowstore import RowStore
    from zps.protocol.tables import TableSpec

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_row = []
        for dim in dims:
            store = RowStore(TableSpec("plan", dim, optimizer="adagrad"))
            for at in range(0, rows, 1 << 18):
                ids = torch.arange(at, min(rows, at + (1 << 18)))
                store.apply(ids, torch.zeros(ids.numel(), dim), None, 0)
            ids = torch.randint(0, rows, (batch,), generator=torch.Generator().manual_seed(0)).unique()
            grads = torch.zeros(ids.numel(), dim)
            times = []
            for step in range(6):
                began = time.perf_counter()
                store.read(ids)
                store.apply(ids, grads, None, step)
                times.append(time.perf_counter() - began)
            per_row.append(statistics.median(times[1:]) / ids.numel())
    finally:
        torch.set_num_threads(threads)
    b = max(0.0, (per_row[-1] - per_row[0]) / (dims[-1] - dims[0]))
    return max(0.0, per_row[0] - b * dims[0]), b


def table_seconds(tables: Tables, workers: int, servers: int, worker_links: Sequence[Link],
                  server_links: Sequence[Link], latency: float, message: float, cost: tuple[float, float]) -> float:
    """What ``tables`` add to one step of every worker (module docstring); 0 without tables."""
    if not tables:
        return 0.0
    each_way = sum(n * (8 + 4 * d) + 64 for n, d in tables)

    def seconds(size: float, link: Link) -> float:
        return size / link.rate if link.rate else 0.0

    own = max(seconds(each_way, wl) for wl in worker_links)
    incast = max(seconds(workers * each_way / servers, sl) for sl in server_links)
    work = workers * sum(n / servers * (cost[0] + cost[1] * d) for n, d in tables)
    return 2 * (latency + message) + 2 * max(own, incast) + work
