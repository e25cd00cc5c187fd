"""Embedding tables without a cluster: the id rule, initial values, row codecs, the row store and its optimizers
against torch's sparse paths, admission, expiry and the cap, and the shard's TABLE / ROWS_PULL / ROWS_PUSH
handlers fed messages directly (tests/test_shard.py's harness)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from zps.protocol import tables as wire
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError
from zps.protocol.rowstore import HashIndex, RowStore
from zps.protocol.tables import TableSpec, initial_rows, server_of
from zps.worker.embedding import EmbeddingTable, _Gather, unique_ids
from zps.worker.local import LocalClient

from .test_shard import Harness

pytestmark = pytest.mark.unit
_IDS = itertools.count(1)

# -- the agreements ---------------------------------------------------------------------------------------------


def test_the_row_rule_is_fixed() -> None:
    """Checkpoints re-spread rows by this rule: it must never change (values pinned)."""
    ids = torch.tensor([0, 1, 2, 3, -1, 1 << 62, 123456789])
    assert server_of(ids, 3).tolist() == [0, 2, 0, 1, 2, 2, 2]
    assert server_of(ids, 1).tolist() == [0] * 7
    spread = torch.bincount(server_of(torch.arange(100_000), 4), minlength=4)
    assert spread.min() > 24_000  # balanced


def test_initial_values_depend_on_name_id_and_seed_only() -> None:
    spec = TableSpec("items", 16)
    ids = torch.tensor([5, -7, 1 << 40])
    first = initial_rows(spec, ids)
    assert torch.equal(first, initial_rows(TableSpec("items", 16, optimizer="adagrad"), ids))
    assert torch.equal(first[1], initial_rows(spec, torch.tensor([-7]))[0])  # not the batch it came in
    assert not torch.equal(first, initial_rows(TableSpec("users", 16), ids))
    assert not torch.equal(first, initial_rows(TableSpec("items", 16, seed=1), ids))
    assert first.abs().max() <= 1 / math.sqrt(16) and first.std() > 0.1
    normal = initial_rows(TableSpec("n", 64, init="normal", scale=0.5), torch.arange(2000))
    assert abs(float(normal.std()) - 0.5) < 0.02 and abs(float(normal.mean())) < 0.01
    assert not initial_rows(TableSpec("z", 4, init="zeros"), ids).any()


@pytest.mark.parametrize("codec,tolerance", [("none", 0.0), ("fp16", 1e-3), ("int8", 1 / 127)])
def test_row_codecs(codec: str, tolerance: float) -> None:
    rows = torch.randn(50, 8)
    rows[3] = 0.0
    frames, size = wire.encode_rows(rows, codec)
    got = wire.decode_rows([bytes(f) for f in frames], codec, 50, 8, "test")
    scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-9)
    assert ((got - rows).abs() / scale).max() <= tolerance + 1e-6
    assert size == {"none": 50 * 8 * 4, "fp16": 50 * 8 * 2, "int8": 50 * 8 + 50 * 4}[codec]
    with pytest.raises(Exception) as info:
        wire.decode_rows([bytes(f) for f in frames], codec, 49, 8, "test")
    assert getattr(info.value, "code", None) in (ErrorCode.FRAME_SIZE, ErrorCode.FRAME_COUNT)


def test_a_table_body_is_checked() -> None:
    spec = TableSpec("t", 4, optimizer="sparse_adam", hp={"lr": 0.1})
    assert wire.read_table(spec.to_body()).same(spec)
    for bad in ({"name": "t"}, {**spec.to_body(), "dim": 0}, {**spec.to_body(), "optimizer": "lbfgs"},
                {**spec.to_body(), "hp": {"lr": float("nan")}}, {**spec.to_body(), "extra": 1},
                {**spec.to_body(), "hp": {"momentum": 0.9}}, {**spec.to_body(), "codec": "topk"}):
        with pytest.raises(Exception) as info:
            wire.read_table(bad)
        assert getattr(info.value, "code", None) is ErrorCode.BAD_HEADER
    assert wire.parse_optimizer("adam:lr=0.01,betas=(0.8,0.9)") == ("sparse_adam", {"lr": 0.01, "betas": (0.8, 0.9)})
    with pytest.raises(ValueError, match="not one of"):
        wire.parse_optimizer("lamb")


# -- the index and the store -----------------------------------------------------------------------------------


def test_hash_index_against_a_dict() -> None:
    g = torch.Generator().manual_seed(0)
    index, ref = HashIndex(), dict[int, int]()
    for round_ in range(30):
        ids = torch.randint(-(1 << 62), 1 << 62, (500,), generator=g)
        ids = torch.cat([ids, torch.arange(round_ * 50, round_ * 50 + 50)]).unique()
        ids = ids[torch.randperm(ids.numel(), generator=g)]
        absent = ids[index.lookup(ids) < 0]
        slots = torch.arange(len(ref), len(ref) + absent.numel()) + 10_000 * round_
        index.insert(absent, slots)
        ref.update(zip(absent.tolist(), slots.tolist(), strict=True))
        gone = torch.tensor(list(ref)[:: 7][:40], dtype=torch.int64)
        index.remove(gone)
        for i in gone.tolist():
            del ref[i]
        probe = torch.cat([ids, gone])
        assert index.lookup(probe).tolist() == [ref.get(i, -1) for i in probe.tolist()]
    assert index.used == len(ref)
    keys, slots = index.items()
    assert dict(zip(keys.tolist(), slots.tolist(), strict=True)) == ref


def _bag_steps(store: RowStore, reference: torch.nn.EmbeddingBag, optimizer: torch.optim.Optimizer, vocab: int,
               steps: int, duplicates: bool) -> None:
    g = torch.Generator().manual_seed(7)
    for step in range(steps):
        ids = (torch.randint(0, vocab, (64,), generator=g) if duplicates
               else torch.randperm(vocab, generator=g)[:64])
        offsets = torch.arange(0, 64, 4)
        target = torch.randn(16, store.dim, generator=g)
        optimizer.zero_grad()
        F.mse_loss(reference(ids, offsets), target).backward()
        optimizer.step()
        unique, inverse = torch.unique(ids, return_inverse=True)
        rows = store.read(unique).requires_grad_()
        F.mse_loss(F.embedding_bag(inverse, rows, offsets, mode="sum"), target).backward()
        assert rows.grad is not None
        store.apply(unique, rows.grad, None, step)


@pytest.mark.parametrize("name,hp,build", [
    ("sgd", {"lr": 0.3}, lambda p: torch.optim.SGD(p, lr=0.3)),
    ("adagrad", {"lr": 0.3, "lr_decay": 0.01, "eps": 1e-8}, lambda p: torch.optim.Adagrad(p, lr=0.3, lr_decay=0.01,
                                                                                          eps=1e-8)),
    ("sparse_adam", {"lr": 0.05, "betas": (0.8, 0.95)}, lambda p: torch.optim.SparseAdam(p, lr=0.05,
                                                                                         betas=(0.8, 0.95))),
])
@pytest.mark.parametrize("duplicates", [False, True])
def test_the_row_optimizers_are_torchs_sparse_ones(name: str, hp: dict[str, Any], build: Any,
                                                    duplicates: bool) -> None:
    """The same bits as nn.EmbeddingBag(sparse=True) and torch's optimizer; with an id twice in a batch, SGD
    differs by rounding only (torch's SGD adds each occurrence's gradient separately, the table their sum)."""
    vocab, dim = 300, 8
    spec = TableSpec("t", dim, optimizer=name, hp=hp)
    store = RowStore(spec)
    reference = torch.nn.EmbeddingBag(vocab, dim, mode="sum", sparse=True)
    with torch.no_grad():
        reference.weight.copy_(initial_rows(spec, torch.arange(vocab)))
    _bag_steps(store, reference, build(reference.parameters()), vocab, 15, duplicates)
    got = store.read(torch.arange(vocab))
    if name == "sgd" and duplicates:
        torch.testing.assert_close(got, reference.weight.detach(), rtol=0, atol=1e-6)
    else:
        assert torch.equal(got, reference.weight.detach())


def test_rowwise_adagrad_keeps_one_accumulator_per_row() -> None:
    spec = TableSpec("t", 4, optimizer="rowwise_adagrad", hp={"lr": 0.1, "eps": 1e-6})
    store = RowStore(spec)
    ids = torch.tensor([3, 9])
    values, acc = initial_rows(spec, ids), torch.zeros(2)
    for step in range(5):
        g = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        store.apply(ids, g, None, step)
        acc += g.pow(2).mean(dim=1)
        values -= 0.1 * g / (acc.sqrt() + 1e-6)[:, None]
    torch.testing.assert_close(store.read(ids), values)
    assert store.nbytes()["state"] == store.capacity * 4  # one float per row


def test_rows_are_stored_at_their_first_update_and_read_as_their_initial_value_before() -> None:
    spec = TableSpec("t", 4, optimizer="sgd", hp={"lr": 1.0})
    store = RowStore(spec)
    assert torch.equal(store.read(torch.tensor([1, 2])), initial_rows(spec, torch.tensor([1, 2])))
    assert len(store) == 0
    store.apply(torch.tensor([2]), torch.ones(1, 4), None, 0)
    assert len(store) == 1
    assert torch.equal(store.read(torch.tensor([2]))[0], initial_rows(spec, torch.tensor([2]))[0] - 1)


def test_admission_after_n_sightings() -> None:
    spec = TableSpec("t", 2, optimizer="sgd", hp={"lr": 1.0}, admit=3)
    store = RowStore(spec)
    ids = torch.tensor([10, 20])
    start = initial_rows(spec, ids)
    store.apply(ids, torch.ones(2, 2), None, 0, sightings=torch.tensor([1, 2]))
    assert len(store) == 0 and torch.equal(store.read(ids), start)  # gradients dropped before admission
    store.apply(ids, torch.ones(2, 2), None, 1)  # 10 seen twice, 20 three times: admitted, this update applied
    assert len(store) == 1
    assert torch.equal(store.read(ids), torch.stack([start[0], start[1] - 1]))
    store.apply(ids, torch.ones(2, 2), None, 2)
    assert torch.equal(store.read(ids), start - torch.tensor([[1.0], [2.0]]))
    assert store.counters["rows_admitted"] == 2 and store.counters["rows_dropped"] == 3


def test_expiry_evicts_rows_not_updated_for_t_steps() -> None:
    spec = TableSpec("t", 2, optimizer="sgd", hp={"lr": 1.0}, expire=4)
    store = RowStore(spec)
    store.apply(torch.tensor([1, 2]), torch.ones(2, 2), None, 0)
    for step in range(1, 9):
        store.apply(torch.tensor([2]), torch.ones(1, 2), None, step)
    assert store.index.lookup(torch.tensor([1, 2])).tolist()[0] == -1 and len(store) == 1
    assert store.counters["rows_evicted_expired"] == 1
    assert torch.equal(store.read(torch.tensor([1])), initial_rows(spec, torch.tensor([1])))


def test_the_cap_is_never_exceeded_and_the_oldest_rows_go() -> None:
    spec = TableSpec("t", 2, optimizer="sgd", hp={"lr": 1.0}, max_rows=100)
    store = RowStore(spec)
    g = torch.Generator().manual_seed(3)
    seen: set[int] = set()
    for step in range(200):
        ids = torch.randint(0, 5000, (40,), generator=g).unique()
        seen |= set(ids.tolist())
        store.apply(ids, torch.ones(ids.numel(), 2), None, step)
        assert len(store) <= 100
        assert (store.index.lookup(ids) >= 0).all()  # this step's rows are held
    assert len(seen) > 10 * 100
    assert store.counters["rows_evicted_cap"] > 0
    big = torch.arange(10_000, 10_150)  # more new rows than the cap in one step: the first 100 (by id) are kept
    store.apply(big, torch.ones(150, 2), None, 200)
    assert len(store) == 100 and store.counters["rows_refused"] == 50
    assert (store.index.lookup(big[:100]) >= 0).all()


def test_a_store_exports_and_loads_its_rows() -> None:
    spec = TableSpec("t", 4, optimizer="sparse_adam", hp={"lr": 0.1})
    store = RowStore(spec)
    for step in range(3):
        ids = torch.tensor([step, 7, 100 + step])
        store.apply(ids, torch.randn(3, 4), None, step)
    tensors, meta = store.export()
    again = RowStore(spec)
    again.load(tensors, meta)
    ids = torch.tensor([0, 1, 2, 7, 100, 101, 102, 55])
    assert torch.equal(store.read(ids), again.read(ids))
    grad = torch.randn(8, 4)
    store.apply(ids, grad, None, 3)
    again.apply(ids, grad, None, 3)
    assert torch.equal(store.read(ids), again.read(ids))


# -- a script with no launcher --------------------------------------------------------------------------------


def test_the_module_with_no_launcher_is_an_embedding_bag() -> None:
    table = EmbeddingTable("t", 6, mode="mean", optimizer="adagrad:lr=0.2", client=LocalClient())
    reference = torch.nn.EmbeddingBag(1000, 6, mode="mean", sparse=True)
    with torch.no_grad():
        reference.weight.copy_(initial_rows(table.spec, torch.arange(1000)))
    opt = torch.optim.Adagrad(reference.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        ids = torch.randint(0, 1000, (8, 5), generator=g)
        target = torch.randn(8, 6, generator=g)
        F.mse_loss(table(ids), target).backward()
        opt.zero_grad()
        F.mse_loss(reference(ids), target).backward()
        opt.step()
    assert table.step == 5
    torch.testing.assert_close(table.rows(torch.arange(1000)), reference.weight.detach(), rtol=0, atol=1e-7)
    assert table.lookup(torch.tensor([[1, 2]])).shape == (1, 2, 6)


def test_a_forward_without_a_backward_changes_no_row() -> None:
    table = EmbeddingTable("t", 3, optimizer="sgd:lr=0.5", client=LocalClient())
    before = table.rows(torch.arange(10))
    table.lookup(torch.tensor([1, 2, 3]))  # no backward: the next forward closes its step without a gradient
    table.lookup(torch.tensor([4, 5])).sum().backward()
    after = table.rows(torch.arange(10))
    assert table.step == 2
    assert torch.equal(after[[0, 1, 2, 3, 6, 7, 8, 9]], before[[0, 1, 2, 3, 6, 7, 8, 9]])
    assert torch.equal(after[[4, 5]], before[[4, 5]] - 0.5)


def test_dedup_and_lookup_backward_match_torch_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(3)
    for vocabulary, shape, dim in ((50, (7, 13), 4), (5000, (4096,), 16), (300, (4, 1024), 64), (9, (0,), 2)):
        ids = torch.randint(0, vocabulary, shape, generator=g)
        unique, inverse = unique_ids(ids)
        want_unique, want_inverse = torch.unique(ids.view(-1), return_inverse=True)
        assert torch.equal(unique, want_unique) and torch.equal(inverse, want_inverse)
        rows = torch.randn(unique.numel(), dim, generator=g, requires_grad=True)
        weight = torch.randn(*shape, dim, generator=g)
        (F.embedding(inverse.view(shape), rows) * weight).sum().backward()
        want = rows.grad
        assert want is not None
        rows.grad = None
        got = _Gather.apply(rows, inverse).view(*shape, dim)
        assert torch.equal(got, F.embedding(inverse.view(shape), rows))
        (got * weight).sum().backward()  # (beyond 3000 ids F.embedding sorts: the same sums)
        assert rows.grad is not None and torch.equal(rows.grad, want)


def test_a_second_forward_before_the_backward_is_refused_loudly() -> None:
    table = EmbeddingTable("t", 2, client=LocalClient())
    first = table(torch.tensor([[1, 2]]))
    second = table(torch.tensor([[3, 4]]))
    with pytest.raises(RuntimeError, match="once per training step"):
        (first.sum() + second.sum()).backward()


# -- the shard service ---------------------------------------------------------------------------------------


def declare(h: Harness, spec: TableSpec, worker: int) -> dict[str, Any]:
    (_, reply), = h.ask(Message(Kind.TABLE, id=next(_IDS), src=f"worker:{worker}", body=spec.to_body()))
    assert reply.kind is Kind.OK, reply.body
    return reply.body


def rows_pull(worker: int, spec: TableSpec, ids: list[int], step: int) -> Message:
    t = torch.tensor(ids, dtype=torch.int64)
    return Message(Kind.ROWS_PULL, id=next(_IDS), src=f"worker:{worker}",
                   keys=[wire.row_entry(spec.key, step, len(ids), nf=1)], frames=[wire.ids_frame(t)])


def rows_push(worker: int, spec: TableSpec, ids: list[int], grads: torch.Tensor, step: int, **fields: Any) -> Message:
    frames, _ = wire.encode_rows(grads, "none")
    return Message(Kind.ROWS_PUSH, id=next(_IDS), src=f"worker:{worker}",
                   keys=[wire.row_entry(spec.key, step, len(ids), nf=2, codec="none", **fields)],
                   frames=[wire.ids_frame(torch.tensor(ids, dtype=torch.int64)), *frames])


def rows_of(reply: Message, dim: int) -> torch.Tensor:
    assert reply.kind is Kind.OK, reply.body
    (entry, frames), = list(reply.entries())
    return wire.decode_rows(frames, str(entry.get("codec")), int(entry["numel"]), dim, "test")


SGD1 = TableSpec("emb", 3, optimizer="sgd", hp={"lr": 1.0})


def test_bsp_sums_a_step_in_rank_order_and_applies_it_once() -> None:
    h = Harness(workers=2)
    for w in (1, 0):
        assert declare(h, SGD1, w) == {"step": 0}
    start = initial_rows(SGD1, torch.tensor([1, 2, 3]))
    # worker 1 first; a pull of step 1 waits for the step
    assert h.ask(rows_push(1, SGD1, [2, 3], torch.ones(2, 3), 0))[0][1].kind is Kind.OK
    assert h.ask(rows_pull(1, SGD1, [1, 2, 3], 1)) == []
    replies = h.ask(rows_push(0, SGD1, [1, 2], torch.full((2, 3), 3.0), 0))
    assert [r.kind for _, r in replies] == [Kind.OK, Kind.OK]
    got = rows_of(replies[1][1], 3)
    assert torch.equal(got, start - torch.tensor([[1.5], [2.0], [0.5]]))  # (sum of the workers') / 2
    # a retry of a push applied already is acknowledged and not applied again; a push ahead is refused
    assert h.ask(rows_push(0, SGD1, [1], torch.ones(1, 3), 0))[0][1].kind is Kind.OK
    assert h.refused(rows_push(0, SGD1, [1], torch.ones(1, 3), 5)) is ErrorCode.STEP_AHEAD
    (_, now), = h.ask(rows_pull(0, SGD1, [1], 1))
    assert torch.equal(rows_of(now, 3)[0], got[0])
    stats = h.shard.stats(h.shard.read.request(b"x", Message(Kind.STATS, src="worker:0"))).reply
    assert stats is not None and stats.body["tables"]["emb"]["duplicate_pushes"] == 1


def test_a_worker_leaving_completes_the_step_that_waited_for_it() -> None:
    h = Harness(workers=2)
    for w in (0, 1):
        declare(h, SGD1, w)
    h.ask(rows_push(0, SGD1, [1], torch.ones(1, 3), 0))
    assert h.ask(rows_pull(0, SGD1, [1], 1)) == []
    replies = h.ask(Message(Kind.LEAVE, id=next(_IDS), src="worker:1"))
    assert [r.kind for _, r in replies] == [Kind.OK, Kind.OK]  # the leave's, and the pull's


def test_asp_applies_every_pushed_row_exactly_once_under_retries() -> None:
    """A soak: 4 workers push 50 steps each, every push sent twice and in a shuffled order between workers; each
    row ends at exactly its initial value minus the sum of every gradient pushed once."""
    h = Harness(mode="asp", workers=4)
    soak = TableSpec("soak", 3, optimizer="sgd", hp={"lr": 1.0}, init="zeros")  # integer sums: exact in any order
    for w in range(4):
        declare(h, soak, w)
    g = torch.Generator().manual_seed(5)
    expected: dict[int, torch.Tensor] = {}
    messages = []
    for w in range(4):
        for step in range(50):
            ids = torch.randint(0, 40, (10,), generator=g).unique().tolist()
            grads = torch.randint(-3, 4, (len(ids), 3), generator=g).float()
            for i, row in zip(ids, grads, strict=True):
                expected[i] = expected.get(i, torch.zeros(3)) + row
            push = rows_push(w, soak, ids, grads, step)
            messages.append((w, step, [push, rows_push(w, soak, ids, grads, step)]))
    order = torch.randperm(4, generator=g).tolist()
    per_worker = {w: [m for m in messages if m[0] == w] for w in range(4)}
    while any(per_worker.values()):
        for w in order:
            if per_worker[w]:
                for msg in per_worker[w].pop(0)[2]:
                    assert h.ask(msg)[0][1].kind is Kind.OK
    ids = sorted(expected)
    (_, reply), = h.ask(rows_pull(0, soak, ids, 0))
    want = initial_rows(soak, torch.tensor(ids)) - torch.stack([expected[i] for i in ids])
    assert torch.equal(rows_of(reply, 3), want)
    table = h.shard.tables.by_key[soak.key]
    assert table.counters["duplicate_pushes"] == 200 and table.version == 200


def test_an_asp_worker_cannot_walk_a_tables_step_past_what_a_row_records() -> None:
    """Each ASP push may jump ahead by at most 2^20 steps; a worker that walked its steps up to the end of a row's
    int32 step record is refused there, by name, and the rows are unchanged (an overflow would have stepped them)."""
    h = Harness(mode="asp", workers=1)
    declare(h, SGD1, 0)
    end = wire.MAX_TABLE_STEP
    h.shard.tables.by_key[SGD1.key].last_step[0] = end - 2  # as if it had pushed ~2,000 jumps of 2^20
    assert h.ask(rows_push(0, SGD1, [1], torch.ones(1, 3), end))[0][1].kind is Kind.OK  # the last step there is
    before = rows_of(h.ask(rows_pull(0, SGD1, [1, 2], 0))[0][1], 3)
    with pytest.raises(ProtocolError, match=f"steps end at {end}") as refused:
        h.ask(rows_push(0, SGD1, [1, 2], torch.ones(2, 3), end + 1))
    assert refused.value.code is ErrorCode.STEP_AHEAD
    assert torch.equal(rows_of(h.ask(rows_pull(0, SGD1, [1, 2], 0))[0][1], 3), before)


def test_bad_table_requests_are_refused_whole() -> None:
    h = Harness(workers=1, servers=2)
    declare(h, SGD1, 0)
    other = TableSpec("emb", 4)
    with pytest.raises(Exception) as info:
        declare(h, other, 0)
    assert getattr(info.value, "code", None) is ErrorCode.CONFLICT
    mine = [i for i in range(20) if server_of(torch.tensor([i]), 2).item() == 0]
    theirs = [i for i in range(20) if server_of(torch.tensor([i]), 2).item() == 1]
    assert h.refused(rows_pull(0, SGD1, theirs[:2], 0)) is ErrorCode.CONFLICT
    assert h.refused(rows_pull(0, SGD1, [mine[0], mine[0]], 0)) is ErrorCode.BAD_HEADER
    assert h.refused(rows_pull(0, TableSpec("nope", 3), mine[:1], 0)) is ErrorCode.UNKNOWN_KEY
    bad = rows_push(0, SGD1, mine[:2], torch.ones(2, 3), 0)
    bad.frames[1] = bytes(8)
    assert h.refused(bad) is ErrorCode.FRAME_SIZE
    nan = rows_push(0, SGD1, mine[:1], torch.full((1, 3), float("nan")), 0)
    assert h.refused(nan) is ErrorCode.BAD_HEADER
    assert h.refused(rows_push(0, SGD1, mine[:1], torch.ones(1, 3), 0, hp={"momentum": 1})) is ErrorCode.BAD_OPTIMIZER
    assert h.shard.tables.by_key[SGD1.key].version == 0  # nothing was applied


def test_a_sparse_embedding_under_a_distributed_optimizer_names_the_table() -> None:
    from zps.worker import DistributedOptimizer

    model = torch.nn.Sequential(torch.nn.EmbeddingBag(10, 4, sparse=True))
    with pytest.raises(ValueError, match="zps.worker.EmbeddingTable"):
        local: Any = LocalClient()
        DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, client=local)


def test_the_plan_counts_a_tables_traffic_as_its_distinct_ids_times_the_row() -> None:
    """zps plan: per worker and way, N ids x (8 + 4 x dim) bytes; a server receives W/S of every worker's (incast)
    and does the row work of W/S of them."""
    from dataclasses import replace

    from zps.lab.planner import Setup, predict, synthetic_model
    from zps.lab.table_plan import parse_table, table_seconds
    from zps.protocol.simulation import Link

    from .test_planner import FREE

    assert parse_table("4096:16") == (4096, 16)
    with pytest.raises(ValueError, match="IDS:DIM"):
        parse_table("many")
    each_way = 4096 * (8 + 4 * 16) + 64
    link = Link(rate=1e6)
    got = table_seconds(((4096, 16),), 4, 2, [link], [link], 0.001, 0.0, (1e-6, 0.0))
    assert got == pytest.approx(2 * 0.001 + 2 * 4 * each_way / 2 / 1e6 + 4 * 4096 / 2 * 1e-6)
    model = synthetic_model(1000, 1, compute=0.005)
    plain = predict(model, Setup(4, 2, net="bw=1mb"), FREE)
    with_table = predict(replace(model, tables=((4096, 16),)), Setup(4, 2, net="bw=1mb"), FREE)
    assert with_table.step == pytest.approx(plain.step + with_table.parts["tables"])
    assert with_table.parts["tables"] > 2 * 4 * each_way / 2 / 1e6  # at least the incast of the rows, both ways


def test_ssp_pulls_wait_for_the_slowest_clock_and_pushes_apply_as_they_come() -> None:
    """SSP with staleness 1: a worker's rows pull of step t is answered once the slowest worker's clock is t - 1;
    pushes are applied as they come (each alone, not averaged over the workers)."""
    h = Harness(mode="ssp", workers=2, staleness=1)
    for w in (0, 1):
        declare(h, SGD1, w)
    start = initial_rows(SGD1, torch.tensor([1]))
    assert h.ask(rows_push(0, SGD1, [1], torch.ones(1, 3), 0))[0][1].kind is Kind.OK
    (_, now), = h.ask(rows_pull(0, SGD1, [1], 1))  # one step ahead of worker 1: within the staleness
    assert torch.equal(rows_of(now, 3), start - 1.0)
    assert h.ask(rows_push(0, SGD1, [1], torch.ones(1, 3), 1))[0][1].kind is Kind.OK
    assert h.ask(rows_pull(0, SGD1, [1], 2)) == []  # two ahead of worker 1 (clock 0): it waits
    replies = h.ask(rows_pull(1, SGD1, [1], 1))  # worker 1 reaches clock 1: both pulls are answered
    assert sorted(r.kind.value for _, r in replies) == ["ok", "ok"] and len({i for i, _ in replies}) == 2
    for _, reply in replies:
        assert torch.equal(rows_of(reply, 3), start - 2.0)


def test_zps_plan_takes_tables_on_its_command_line(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``zps plan --table IDS:DIM``: a wrong one is refused by name; a right one adds the tables' column."""
    from zps.lab import plan_cli
    from zps.launcher.cli import main as zps_main

    base = ["plan", "--params", "100000", "--tensors", "4", "--compute-ms", "5", "-w", "2", "-s", "1",
            "--net", "bw=100mbit"]
    assert zps_main([*base, "--table", "many"]) == 2
    assert "expected IDS:DIM" in capsys.readouterr().err
    monkeypatch.setattr(plan_cli, "row_cost", lambda: (1e-6, 1e-8))  # (measuring it takes seconds)
    assert zps_main([*base, "--table", "4096:16"]) == 0
    out = capsys.readouterr().out
    assert "tables" in out and "the embedding tables' rows" in out  # at 100 Mbit/s the rows are the bottleneck
    assert "The ring and BytePS are predicted without the tables" in out
