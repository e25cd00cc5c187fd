"""``zps plan --table N:DIM[:ROWS]``: what embedding tables add to a step (docs/embeddings.md).

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

# per table: (distinct ids in a worker's batch, dim) or (ids, dim, rows): ``rows``, the table's whole vocabulary, is
# what all-reduce would hold and reduce (zps's own step needs only the ids and the dim)
Tables = tuple[tuple[int, ...], ...]


def parse_table(text: str) -> tuple[int, ...]:
    """``"4096:16"`` -> (4096, 16); ``"4096:16:10000000"`` -> (4096, 16, 10000000) (ROWS: the table's rows in all,
    ``1e7`` or ``10_000_000`` too); ValueError naming what is wrong."""
    parts = text.split(":")
    try:
        if len(parts) > 3:
            raise ValueError
        ids, dim = int(parts[0]), int(parts[1]) if len(parts) > 1 and parts[1] else 16
        rows = [_count(parts[2])] if len(parts) == 3 else []
    except ValueError:
        raise ValueError(f"--table {text!r}: expected IDS:DIM or IDS:DIM:ROWS (distinct ids per worker batch, row "
                         "width, the table's rows in all)") from None
    if ids < 0 or dim < 1:
        raise ValueError(f"--table {text!r}: ids must be >= 0 and dim >= 1")
    if rows and rows[0] < ids:
        raise ValueError(f"--table {text!r}: ROWS (the table's rows in all) must be >= IDS (a batch's distinct ids)")
    return (ids, dim, *rows)


def _count(text: str) -> int:
    """``"10000000"``, ``"10_000_000"`` or ``"1e7"`` -> 10000000 (ValueError for anything else)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


def rows_of(table: tuple[int, ...]) -> int | None:
    """A table's rows in all, None where not given."""
    return table[2] if len(table) > 2 else None


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
    each_way = sum(n * (8 + 4 * d) + 64 for n, d, *_ in tables)

    def seconds(size: float, link: Link) -> float:
        return size / link.rate if link.rate else 0.0

    own = max(seconds(each_way, wl) for wl in worker_links)
    incast = max(seconds(workers * each_way / servers, sl) for sl in server_links)
    work = workers * sum(n / servers * (cost[0] + cost[1] * d) for n, d, *_ in tables)
    return 2 * (latency + message) + 2 * max(own, incast) + work
