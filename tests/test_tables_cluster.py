"""Embedding tables on a real cluster (servers in threads, ZeroMQ on loopback): a BSP job with a table and dense
parameters equals one process training nn.EmbeddingBag(sparse=True) with the same optimizers on the same batches,
with one worker and with two; ASP applies every push once; the hybrid, prefetching and compressed rows."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zps.protocol.tables import TableSpec, initial_rows, parse_optimizer
from zps.worker import DistributedOptimizer, EmbeddingTable, prefetching
from zps.worker.client import Client

from .helpers import close_all, local_cluster, run_parallel

pytestmark = pytest.mark.cluster

VOCAB, DIM, BAG, BATCH, STEPS = 400, 8, 3, 6, 12
TABLE_OPTIMIZERS: dict[str, tuple[str, Callable[[Any], torch.optim.Optimizer]]] = {
    "sgd": ("sgd:lr=0.5", lambda p: torch.optim.SGD(p, lr=0.5)),
    "adagrad": ("adagrad:lr=0.3", lambda p: torch.optim.Adagrad(p, lr=0.3)),
    "sparse_adam": ("adam:lr=0.05", lambda p: torch.optim.SparseAdam(p, lr=0.05)),
}


def _head() -> nn.Module:
    torch.manual_seed(11)
    return nn.Linear(DIM, 1)


HEAD = _head()


def data(workers: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, per worker: a batch of bags of ids (Zipf-ish: repeats within and across workers) and targets."""
    g = torch.Generator().manual_seed(3)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    return [[(torch.multinomial(weights, BATCH * BAG, replacement=True, generator=g).view(BATCH, BAG) * 7919 - 50,
              torch.randn(BATCH, 1, generator=g)) for _ in range(workers)] for _ in range(STEPS)]


def reference(optimizer: str, batches: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> tuple[dict, nn.Module]:
    """One process: nn.EmbeddingBag(sparse=True) over every id the batches hold, the dense head, torch's optimizers;
    each step's gradients are the workers' averaged (each worker's loss backward on its own batch, summed in rank
    order, divided by their number: what a BSP job computes)."""
    spec = TableSpec("emb", DIM, *parse_optimizer(TABLE_OPTIMIZERS[optimizer][0]))
    vocab = torch.unique(torch.cat([x.reshape(-1) for step in batches for x, _ in step]))
    bag = nn.EmbeddingBag(vocab.numel(), DIM, mode="sum", sparse=True)
    with torch.no_grad():
        bag.weight.copy_(initial_rows(spec, vocab))
    head = copy.deepcopy(HEAD)
    table_opt = TABLE_OPTIMIZERS[optimizer][1](bag.parameters())
    head_opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for step in batches:
        table_grad = torch.zeros(vocab.numel(), DIM)
        head_grads = [torch.zeros_like(p) for p in head.parameters()]
        for x, y in step:
            bag.zero_grad()
            head.zero_grad()
            F.mse_loss(head(bag(torch.searchsorted(vocab, x))), y).backward()
            assert bag.weight.grad is not None
            table_grad += bag.weight.grad.coalesce().to_dense()
            for total, p in zip(head_grads, head.parameters(), strict=True):
                assert p.grad is not None
                total += p.grad
        touched = torch.unique(torch.searchsorted(vocab, torch.cat([x.reshape(-1) for x, _ in step])))
        bag.weight.grad = torch.sparse_coo_tensor(touched[None], table_grad[touched] / len(step),  # noqa
                                                  (vocab.numel(), DIM))
        for total, p in zip(head_grads, head.parameters(), strict=True):
            p.grad = total / len(step) if len(step) > 1 else total
        table_opt.step()
        head_opt.step()
    return dict(zip(vocab.tolist(), bag.weight.detach(), strict=True)), head


def train(client: Client, rank: int, optimizer: str, batches: list[list[tuple[torch.Tensor, torch.Tensor]]],
          prefetch: bool = False, **table: Any) -> tuple[torch.Tensor, nn.Module, dict[str, int]]:
    head = copy.deepcopy(HEAD)
    emb = EmbeddingTable("emb", DIM, mode="sum", optimizer=TABLE_OPTIMIZERS[optimizer][0], client=client, **table)
    opt = DistributedOptimizer(torch.optim.SGD(head.parameters(), lr=0.1), head, client=client)
    mine = [step[rank] for step in batches]
    it = prefetching(mine, lambda b: {emb: b[0]}) if prefetch else iter(mine)
    for x, y in it:
        opt.zero_grad()
        F.mse_loss(head(emb(x)), y).backward()
        opt.step()
    emb.synchronize()
    opt.synchronize()
    vocab = torch.unique(torch.cat([x.reshape(-1) for step in batches for x, _ in step]))
    return emb.rows(vocab), head, emb.counters


@pytest.mark.parametrize("workers,servers,optimizer", [
    (1, 1, "sgd"), (1, 2, "sparse_adam"), (2, 2, "sgd"), (2, 2, "adagrad"), (2, 1, "sparse_adam"),
])
def test_bsp_equals_one_process_with_embedding_bag(workers: int, servers: int, optimizer: str) -> None:
    """The table's rows and the dense head equal one process with nn.EmbeddingBag(sparse=True), bit for bit."""
    batches = data(workers)
    want_rows, want_head = reference(optimizer, batches)
    with local_cluster(servers, workers) as cluster:
        clients = cluster.clients()
        try:
            results = run_parallel(lambda r: train(clients[r], r, optimizer, batches), range(workers))
        finally:
            close_all(clients)
    for rows, head, _ in results:
        assert torch.equal(rows, torch.stack(list(want_rows.values())))
        for got, want in zip(head.parameters(), want_head.parameters(), strict=True):
            assert torch.equal(got, want)


def test_prefetching_and_the_hybrid() -> None:
    """Prefetching the next batch's rows changes nothing in BSP; a table declared async in a BSP job applies its
    pushes as they come (each once: every server applied workers x steps pushes) while the head stays BSP."""
    batches = data(2)
    want_rows, _ = reference("adagrad", batches)
    with local_cluster(2, 2) as cluster:
        clients = cluster.clients()
        try:
            got = run_parallel(lambda r: train(clients[r], r, "adagrad", batches, prefetch=True), range(2))
            assert torch.equal(got[0][0], torch.stack(list(want_rows.values())))
            assert got[0][2]["rows_pulled"] > 0
            hybrid = run_parallel(lambda r: _hybrid(clients[r], r, batches), range(2))
            stats = clients[0].stats()
        finally:
            close_all(clients)
    table = [s["tables"]["hybrid"] for s in stats]
    assert {t["mode"] for t in table} == {"asp"}
    assert [t["version"] for t in table] == [2 * STEPS, 2 * STEPS]
    assert sum(t["rows_pushed"] for t in table) == sum(hybrid)


def _hybrid(client: Client, rank: int, batches: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> int:
    emb = EmbeddingTable("hybrid", DIM, mode="sum", optimizer="adagrad:lr=0.3", sync="async", client=client)
    for step in batches:
        x, y = step[rank]
        F.mse_loss(emb(x).sum(1, keepdim=True), y).backward()
    emb.synchronize()
    return emb.counters["rows_pushed"]


@pytest.mark.parametrize("codec,tolerance", [("fp16", 2e-3), ("int8", 5e-2)])
def test_compressed_rows_train_close_to_float32(codec: str, tolerance: float) -> None:
    batches = data(1)
    want_rows, _ = reference("adagrad", batches)
    with local_cluster(2, 1) as cluster:
        clients = cluster.clients()
        try:
            rows, _, counters = train(clients[0], 0, "adagrad", batches, codec=codec)
        finally:
            close_all(clients)
    want = torch.stack(list(want_rows.values()))
    assert (rows - want).abs().max() < tolerance * want.abs().max()
    per_row = {"fp16": 2 * DIM, "int8": DIM + 4}[codec]
    assert counters["bytes_pulled"] == counters["rows_pulled"] * (8 + per_row)


def test_a_dynamic_vocabulary_ten_times_the_cap_never_exceeds_it() -> None:
    """Every step brings new ids: the job sees more than 10x the per-server cap of distinct ids, and no server ever
    holds more rows than its cap (admission after two sightings, evictions counted)."""
    cap, steps = 250, 40
    with local_cluster(2, 1) as cluster:
        clients = cluster.clients()
        try:
            table = EmbeddingTable("vocab", 4, optimizer="adagrad:lr=0.1", max_rows=cap, admit=2, client=clients[0])
            g = torch.Generator().manual_seed(0)
            seen: set[int] = set()
            for step in range(steps):
                fresh = torch.arange(step * 150, step * 150 + 150)  # new ids, and some seen before
                ids = torch.cat([fresh, torch.randint(0, step * 150 + 150, (50,), generator=g)])
                seen |= set(ids.tolist())
                table.lookup(ids).pow(2).sum().backward()
                table.synchronize()
                held = [s["rows"] for s in table.stats()]
                assert max(held) <= cap, (step, held)
            stats = table.stats()
        finally:
            close_all(clients)
    assert len(seen) > 10 * cap * 2  # ten times what the two servers may hold together
    assert sum(s["rows_evicted_cap"] for s in stats) > 0 and sum(s["rows_admitted"] for s in stats) > 0
    assert sum(s["rows_dropped"] for s in stats) > 0  # first sightings are not stored
