"""zps plan's model: its arithmetic on configurations small enough to work out by hand."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from zps.lab.plan_compare import (
    DDP_BUCKET,
    RING,
    SPARSE,
    byteps,
    byteps_equal_links,
    byteps_share,
    ddp_sparse,
    gradient_bytes,
    ring_allreduce,
    tables_left_out,
    verdict,
    worker_memory,
)
from zps.lab.plan_probe import ProbeError, probe_script
from zps.lab.planner import (
    Costs,
    Model,
    Setup,
    model_from,
    parse_counts,
    predict,
    server_counts,
    servers_needed,
    synthetic_model,
)
from zps.launcher.cli import main as zps_main

from .helpers import ROOT

PLAN_ME = str(ROOT / "tests" / "scripts" / "plan_me.py")

FREE = Costs(encode_key=0, encode_elem=0, decode_key=0, decode_elem=0, pull_encode_key=0, pull_encode_elem=0,
             pull_decode_key=0, pull_decode_elem=0, apply_elem=0, message=0, wire_ratio=0.1, pull_wire_ratio=1.0,
             copy_key=0, copy_elem=0)
HEADER = 64  # bytes the model counts per key beside its data


@pytest.mark.unit
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_bsp_transfer_is_incast_at_the_server_plus_both_links_latency(workers: int) -> None:
    model = synthetic_model(1000, 1, compute=0.005)
    p = predict(model, Setup(workers, 1, net="bw=1mb,latency=1ms"), FREE)
    key = 4 * 1000 + HEADER
    one_way = workers * key / 1e6 + 0.002  # W keys through the server's 1 MB/s link; 1 ms each link
    assert p.parts["push"] == pytest.approx(one_way) and p.parts["pull"] == pytest.approx(one_way)
    assert p.step == pytest.approx(0.005 + 2 * one_way)
    assert p.bottleneck == ("the links (push)" if workers == 1 else "the servers' links (push, incast)")


@pytest.mark.unit
def test_replies_to_a_first_message_overlap_the_pushes_of_the_later_ones() -> None:
    # three keys of 1M float32 (4 MB each): three messages to the one server, each a third of the bytes
    model = synthetic_model(3_000_000, 3, compute=0.0)
    p = predict(model, Setup(2, 1, net="bw=1gbit"), FREE)
    message = 2 * (4 * 1_000_000 + HEADER) / 125e6  # both workers' copies of one message through the server's link
    assert p.parts["push"] == pytest.approx(3 * message)  # every push in
    # the first message's replies start once it is in; the replies then follow one another back to back
    assert p.step == pytest.approx(message + 3 * message)
    assert p.parts["pull"] == pytest.approx(message)  # what the pulls add after the last push: the last reply
    assert sum(p.parts.values()) == pytest.approx(p.step)
    one = predict(synthetic_model(1_000_000, 1, compute=0.0), Setup(2, 1, net="bw=1gbit"), FREE)
    assert one.step == pytest.approx(2 * message)  # one message: nothing to overlap


@pytest.mark.unit
def test_a_codec_shrinks_what_crosses_and_adds_its_own_time() -> None:
    model = synthetic_model(100_000, 2, compute=0.0)
    costs = Costs(**{**FREE.__dict__, "encode_key": 1e-3, "encode_elem": 1e-8})
    plain = predict(model, Setup(1, 1, net="bw=100mbit"), costs)
    topk = predict(model, Setup(1, 1, net="bw=100mbit", codec="topk:ratio=0.05"), costs)
    assert topk.parts["encode"] == pytest.approx(2 * (1e-3 + 1e-8 * 50_000))
    assert topk.parts["push"] == pytest.approx(2 * (0.1 * 4 * 50_000 + HEADER) / 12.5e6)
    assert plain.parts["push"] == pytest.approx(2 * (4 * 50_000 + HEADER) / 12.5e6)
    assert topk.parts["pull"] == plain.parts["pull"]  # no pull codec: pulls are as big as before


@pytest.mark.unit
def test_asp_does_not_wait_for_the_others_until_the_server_is_the_limit() -> None:
    model = synthetic_model(1000, 1, compute=0.010)
    bsp = predict(model, Setup(4, 1, net="bw=1mb"), FREE)
    asp = predict(model, Setup(4, 1, net="bw=1mb", mode="asp"), FREE)
    key = 4 * 1000 + HEADER
    # the server's link carries every worker's push and pull: 4 x 2 keys per round
    assert asp.step == pytest.approx(max(0.010 + key / 1e6, 4 * 2 * key / 1e6))  # push and pull overlap
    assert asp.step < bsp.step
    assert asp.bottleneck == "the servers' links (every worker's traffic)"
    assert sum(asp.parts.values()) == pytest.approx(asp.step)  # the wait for the servers shows as apply
    alone = predict(model, Setup(1, 1, net="bw=1mb", mode="asp"), FREE)  # one worker: its own path
    assert alone.step == pytest.approx(0.010 + key / 1e6) and alone.bottleneck == "the workers' compute"


@pytest.mark.unit
def test_the_servers_bound_when_their_links_take_longer_than_a_workers_own_work() -> None:
    model = synthetic_model(400_000, 40, compute=0.050)
    key = 4 * 10_000 + HEADER
    own = 0.050 + 40 * key / 125e6  # compute, then its 40 keys through its own 1 Gbit/s link
    # S servers: the busiest holds ceil(40 / S) keys and takes 16 of each through its link
    assert 16 * 14 * key / 125e6 > own >= 16 * 10 * key / 125e6  # S = 3 holds 14 keys, S = 4 holds 10
    three = predict(model, Setup(16, 3, net="bw=1gbit"), FREE)
    assert three.servers_bound and three.servers_busy == pytest.approx(16 * 14 * key / 125e6)
    assert three.workers_busy == pytest.approx(own)
    assert not predict(model, Setup(16, 4, net="bw=1gbit"), FREE).servers_bound


@pytest.mark.unit
def test_servers_needed_are_the_fewest_within_a_stated_margin_of_the_fastest() -> None:
    model = Model("one big key", (1000, 100, 100), compute=0.0)  # the 1000-element key stays on one server
    # S = 1: the three keys in one message, 8 workers' copies each way at 1 MB/s; from S = 2 the big key has a server
    # of its own, and more servers do not make it smaller
    one, two = 2 * 8 * (1200 * 4 + 3 * HEADER) / 1e6, 2 * 8 * (4000 + HEADER) / 1e6
    need = servers_needed(model, Setup(8, 1, net="bw=1mb"), FREE)
    assert (need.servers, need.best_servers, need.within, need.most) == (2, 2, 0.10, 3)  # 3 keys: no more servers
    assert need.step == pytest.approx(two) and need.best == pytest.approx(two)
    assert one / two == pytest.approx(1.228, abs=1e-3)  # 23% slower: outside 10%, inside 25%
    assert servers_needed(model, Setup(8, 1, net="bw=1mb"), FREE, within=0.25).servers == 1
    assert "within 10% of the fastest over 1 to 3 servers" in need.definition()
    # the definition, on a model with many keys: the fewest S within 10%, and S - 1 is not
    many = synthetic_model(400_000, 40, compute=0.050)
    tried = server_counts(many, Setup(16, 1, net="bw=1gbit"), FREE)
    need = servers_needed(many, Setup(16, 1, net="bw=1gbit"), FREE, tried=tried)
    best = min(p.step for p in tried)
    assert len(tried) == 40 and need.best == best
    assert tried[need.servers - 1].step <= 1.1 * best < tried[need.servers - 2].step


@pytest.mark.unit
def test_the_slowest_worker_link_and_the_jitter_set_a_bsp_step() -> None:
    model = synthetic_model(1000, 1, compute=0.0)
    net = "bw=1mb,latency=1ms,jitter=1ms;worker:1=bw=0.5mb"
    p = predict(model, Setup(2, 1, net=net), FREE)
    key = 4 * 1000 + HEADER
    # worker 1's link: key / 0.5 MB/s = 2 x key / 1 MB/s, the same as the server's with 2 workers' keys
    one_way = 2 * key / 1e6 + 2 * (0.001 + 0.001)
    assert p.parts["push"] == pytest.approx(one_way) and p.step == pytest.approx(2 * one_way)
    asp = predict(model, Setup(2, 1, net=net, mode="asp"), FREE)
    own = [key / 1e6 + 4 * 0.002, 2 * key / 1e6 + 4 * 0.002]  # each its own link, both ways' latency and jitter
    assert asp.step == pytest.approx(max(2 / (1 / own[0] + 1 / own[1]), 2 * 2 * key / 1e6))


@pytest.mark.unit
def test_parse_counts() -> None:
    assert parse_counts(["64,128", "256"]) == [64, 128, 256]
    assert parse_counts(["64..1024"]) == [64, 128, 256, 512, 1024]
    assert parse_counts(["1..1", "3"]) == [1, 3]
    for bad in (["0"], ["8..4"], [","], ["x"]):
        with pytest.raises(ValueError):
            parse_counts(bad)


@pytest.mark.unit
def test_a_latency_bound_step_says_so() -> None:
    p = predict(synthetic_model(1000, 1, compute=0.0), Setup(1, 1, net="bw=1gbit,latency=10ms"), FREE)
    assert p.parts["push"] == pytest.approx((4000 + HEADER) / 125e6 + 0.020)
    assert p.bottleneck == "the links' latency (push)"


# -- against all-reduce and BytePS --------------------------------------------------------------------------------
@pytest.mark.unit
def test_the_ring_moves_twice_the_model_over_w_and_pays_its_hops() -> None:
    model = synthetic_model(1_000_000, 10, compute=0.1)
    costs = Costs(**{**FREE.__dict__, "message": 1e-4, "apply_elem": 1e-9, "copy_elem": 2e-9})
    ring = ring_allreduce(model, Setup(4, 2, net="bw=1gbit,latency=1ms"), costs)
    # 2 x 3/4 of 4 MB through each worker's 125 MB/s link; 2 x 3 hops of 1 ms + 1 ms (two links; zps's message cost
    # is not a collective library's)
    assert ring.parts["transfer"] == pytest.approx(1.5 * 4e6 / 125e6)
    assert ring.parts["latency"] == pytest.approx(6 * 0.002)
    assert ring.parts["sum"] == pytest.approx(0.75 * 1e6 * 2e-9) and ring.parts["optimizer"] == pytest.approx(1e-3)
    assert ring.step == pytest.approx(0.1 + 0.048 + 0.012 + 0.0015 + 0.001)
    big = synthetic_model(20_000_000, 10, compute=0.0)  # 80 MB: four of DDP's 25 MiB buckets, each a ring
    assert ring_allreduce(big, Setup(4, 2, net="latency=1ms"), FREE).parts["latency"] == pytest.approx(4 * 6 * 0.002)
    assert 80e6 / DDP_BUCKET == pytest.approx(3.05, abs=0.01)
    assert gradient_bytes(model, Setup(4, 2, codec="fp16")) == 2e6  # a summable codec halves what the ring moves


@pytest.mark.unit
def test_byteps_is_the_ring_without_servers_and_a_parameter_server_with_as_many_as_workers() -> None:
    model = synthetic_model(1_000_000, 10, compute=0.0)
    m, rate = 4e6, 125e6
    for k in (1, 2, 4, 8):
        got = byteps(model, Setup(8, k, net="bw=1gbit"), FREE)
        assert got.parts["transfer"] == pytest.approx(byteps_equal_links(8, k, m, rate))  # the paper's closed form
    assert byteps_equal_links(8, 0, m, rate) == pytest.approx(2 * 7 / 8 * m / rate)  # k = 0: the ring
    assert byteps_equal_links(8, 8, m, rate) == pytest.approx(m / rate)  # k = W: M / B
    assert byteps_share(8, 0, rate, rate) == 0.0 and byteps_share(8, 8, rate, rate) == pytest.approx(1.0)
    # faster servers take a larger share, and the share balances the workers' links against the servers'
    x = byteps_share(8, 2, rate, 1.5 * rate)
    a = 2 * 7 / 8
    assert 1 > x > byteps_share(8, 2, rate, rate)
    assert (x + a * (1 - x)) * m / rate == pytest.approx(8 * x * m / (2 * 1.5 * rate))
    assert byteps_share(8, 2, rate, 10 * rate) == 1.0  # servers so fast that everything goes through them


@pytest.mark.unit
def test_the_verdict_weighs_servers_against_the_ring_for_a_big_model_on_many_workers() -> None:
    model = synthetic_model(14_000_000, 100, compute=0.0)  # the 14M-parameter LM
    v = verdict(model, Setup(64, 4, net="bw=10gbit,latency=0.05ms"), FREE, within=0.10)
    ps = 64 * 56e6 / 4 / 1.25e9  # each of 4 servers' links carries 64 workers' quarter of 56 MB, each way
    assert ps < v.ps.step < 2 * ps  # (push and pull overlap message by message: less than both in sequence)
    by = {c.name: c for c in v.candidates}
    ring = by[RING]
    assert ring.step == pytest.approx(2 * 63 / 64 * 56e6 / 1.25e9 + 3 * 2 * 63 * 0.0001)  # 3 buckets of 25 MiB
    assert v.ps.step > 5 * ring.step and by["BytePS (k=4)"].step < ring.step  # 4 summation servers help the ring
    # free of per-message costs, as many servers as keys beat the ring: M / B each way (overlapped) against 2 M / B
    assert v.fastest.name == f"zps (S={v.need.servers})" and v.says().startswith(f"zps (S={v.need.servers}), ")
    assert [c.step for c in v.candidates] == sorted(c.step for c in v.candidates)
    assert v.matches_ring is not None  # with enough servers zps is no slower ...
    tried = server_counts(model, Setup(64, 4, net="bw=10gbit,latency=0.05ms"), FREE)
    assert tried[v.matches_ring - 1].step <= ring.step < tried[v.matches_ring - 2].step  # ... and not before
    small = verdict(synthetic_model(1000, 2, compute=0.1), Setup(2, 1, net="bw=10gbit"), FREE, within=0.10)
    assert small.says().startswith("about equal: ")  # compute-bound: every architecture within 5%


# -- embedding tables under all-reduce ----------------------------------------------------------------------------
TABLE = (1000, 16, 2_000_000)  # 1,000 distinct ids per worker batch, 16 wide, 2M rows in all (32M elements)


@pytest.mark.unit
def test_a_table_is_a_dense_parameter_to_the_ring_and_byteps_and_its_rows_are_gathered_by_sparse_ddp() -> None:
    from dataclasses import replace

    from zps.lab.table_plan import parse_table

    assert parse_table("1000:16:2000000") == TABLE and parse_table("1000:16:2e6") == TABLE
    assert parse_table("4096:16") == (4096, 16)  # ROWS unknown
    for bad in ("10:16:5", "1:2:3:4", "10:16:2.5"):
        with pytest.raises(ValueError, match="IDS:DIM|ROWS"):
            parse_table(bad)
    dense = synthetic_model(1_000_000, 10, compute=0.1)
    model = replace(dense, tables=(TABLE,))
    setup = Setup(4, 2, net="bw=1gbit,latency=1ms")  # 125 MB/s, a hop between two workers 2 ms
    # the ring: the table's whole dense gradient joins M (33M float32 elements: 6 buckets of 25 MiB)
    assert gradient_bytes(model, setup) == 4 * 33e6
    ring = ring_allreduce(model, setup, FREE)
    assert ring.parts["transfer"] == pytest.approx(1.5 * 132e6 / 125e6)
    assert ring.parts["latency"] == pytest.approx(2 * 3 * 6 * 0.002)
    assert byteps(model, setup, FREE).parts["transfer"] > byteps(dense, setup, FREE).parts["transfer"] * 30
    costs = Costs(**{**FREE.__dict__, "apply_elem": 1e-9})
    assert ring_allreduce(model, setup, costs).parts["optimizer"] == pytest.approx(33e6 * 1e-9)  # every row, every step
    # sparse DDP: the dense part as the ring's, and each worker receives the 3 others' 1,000 rows (id + 16 floats)
    sparse = ddp_sparse(model, setup, FREE)
    alone = ring_allreduce(dense, setup, FREE)
    assert sparse.parts["transfer"] == pytest.approx(alone.parts["transfer"] + 3 * 1000 * 72 / 125e6)
    assert sparse.parts["latency"] == pytest.approx(alone.parts["latency"] + 3 * 3 * 0.002)
    assert ddp_sparse(model, setup, costs).parts["optimizer"] == pytest.approx((1e6 + 4 * 1000 * 16) * 1e-9)
    # memory, at least (float32 values and gradients): the ring holds the table and its dense gradient
    assert worker_memory(model, setup, "dense") == 8e6 + 8 * 32e6
    assert worker_memory(model, setup, "sparse") == 8e6 + 4 * 32e6 + 4 * 1000 * 72
    assert worker_memory(model, setup, "zps") == 8e6 + 8 * 1000 * 16
    # a table of unknown size is left out of the ring (and said to be)
    unknown = replace(dense, tables=(TABLE[:2],))
    assert tables_left_out(unknown) and not tables_left_out(model)
    assert ring_allreduce(unknown, setup, FREE).step == alone.step


@pytest.mark.unit
def test_all_reduce_cannot_train_a_table_larger_than_a_workers_memory() -> None:
    from dataclasses import replace

    model = replace(synthetic_model(1_000_000, 10, compute=0.1), tables=(TABLE,))
    setup = Setup(4, 2, net="bw=1gbit,latency=1ms")
    free = verdict(model, setup, FREE, within=0.10)
    assert not free.unfit and free.fastest.name == SPARSE  # no memory stated: sparse DDP is fastest here
    # 200 MB: the table and its dense gradient (264 MB) do not fit, the table alone (136 MB) does
    mid = verdict(model, replace(setup, worker_memory=200e6), FREE, within=0.10)
    assert {c.name for c in mid.unfit} == {RING, "BytePS (k=2)"} and mid.fastest.name == SPARSE
    assert "out of memory: " in mid.says() and "at least 0.25 GiB, over the 0.19 GiB stated" in mid.says()
    # 100 MB: no all-reduce can hold the table; zps's workers hold their batch's rows only (8.1 MB)
    small = verdict(model, replace(setup, worker_memory=100e6), FREE, within=0.10)
    assert {c.name for c in small.unfit} == {RING, "BytePS (k=2)", SPARSE}
    assert small.fastest.name.startswith("zps") and all(c.name.startswith("zps") for c in small.winners())
    assert small.says().startswith("zps (S=") and "out of memory" in small.says()
    assert [c.fits for c in small.candidates] == sorted((c.fits for c in small.candidates), reverse=True)


@pytest.mark.unit
def test_zps_plan_says_when_all_reduce_cannot_hold_the_tables(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from zps.lab import plan_cli

    monkeypatch.setattr(plan_cli, "row_cost", lambda: (1e-6, 1e-8))  # (measuring it takes seconds)
    base = ["plan", "--params", "100000", "--tensors", "4", "--compute-ms", "5", "-w", "2", "-s", "1", "--net",
            "bw=10gbit", "--table", "4096:16:10000000"]
    assert zps_main([*base, "--worker-memory", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "(OOM)" in out and "All-reduce cannot train this model on workers of 0.5 GiB" in out
    assert "the ring cannot hold the model in --worker-memory" in out
    assert zps_main(base) == 0
    out = capsys.readouterr().out
    assert "(OOM)" not in out and "give --worker-memory GIB" in out and "640.0 MB" in out
    assert zps_main([*base, "--worker-memory", "-1"]) == 2


# -- the model of a script ----------------------------------------------------------------------------------------
def tiny_model() -> torch.nn.Module:
    """For ``--model tests.test_planner:tiny_model``."""
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))


@pytest.mark.unit
def test_module_function_gives_the_model_without_running_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    model = model_from("tests.test_planner:tiny_model")
    assert model.sizes == (12, 4, 4, 1) and model.compute == 0.0
    for bad, says in (("tests.test_planner:nothing", "has no attribute 'nothing'"), ("no_such_module:f", "No module"),
                      ("justaname", "expected a script's path or module:function"),
                      ("os:getcwd", "returned a str, not a torch.nn.Module")):
        with pytest.raises(ValueError, match=says):
            model_from(bad)


@pytest.mark.cluster  # (a process: the script under the stand-in)
def test_any_zps_script_is_planned_from_its_first_steps(tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZPS_TEST_TAG", tag)
    monkeypatch.setenv("ZPS_ROLE", "worker")  # (the stand-in runs the script with no launcher's variables)
    got = probe_script(PLAN_ME, ["--steps", "100"], warmup=2, steps=3)
    assert got.names == ("0.weight", "0.bias", "1.weight", "1.bias") and got.sizes == (50, 5, 10, 2)
    assert got.batch == 4 and got.optimizer == "sgd:lr=0.1,momentum=0.9"
    assert got.steps == 6 and len(got.computes) == 3  # stopped after 2 + 3 timed steps and one more
    assert 0.03 <= got.compute < 0.5  # its 30 ms of compute, and the forward and backward
    with pytest.raises(ProbeError, match="built no zps.worker.DistributedOptimizer"):
        probe_script(PLAN_ME, ["--no-optimizer"])
    with pytest.raises(ProbeError, match="ended after 1 step"):
        probe_script(PLAN_ME, ["--steps", "1"])
    assert os.environ["ZPS_ROLE"] == "worker"


@pytest.mark.cluster  # (a process: examples/lm.py's first steps)
def test_zps_plan_of_the_unmodified_lm_says_which_architecture_wins(tag: str, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ZPS_TEST_TAG", tag)
    monkeypatch.chdir(ROOT)
    assert zps_main(["plan", "--model", "examples/lm.py", "--model-args", "--text-bytes 200000", "-w", "8", "64",
                     "1024", "-s", "4", "--net", "bw=10gbit,latency=0.05ms"]) == 0
    out = capsys.readouterr().out
    assert "lm: 2,566,976 parameters in 134 tensors (134 keys)" in out and "(batch 8)" in out
    assert "servers' optimizer adam:lr=0.002 (the script's)" in out
    assert "servers needed: the fewest servers whose predicted step is within 10% of the fastest over 1 to 134" in out
    verdicts = out[out.index("parameter servers, all-reduce or BytePS"):]
    rows = [line.split("│") for line in verdicts.splitlines() if line.startswith("│ ")]
    rows = [r for r in rows if r[1].strip()]  # (a cell's text that wraps continues on lines of its own)
    assert [r[1].strip() for r in rows[:3]] == ["8", "64", "1024"]
    assert "ring" in rows[2][7]  # a thousand workers on 4 servers: the ring (or BytePS beside it) wins
    assert float(rows[2][3].replace(",", "")) > 5 * float(rows[2][5].replace(",", ""))  # zps, S=4 against the ring


@pytest.mark.cluster  # (a process: the script alone)
def test_the_lm_runs_alone_with_no_launcher(tag: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("ZPS_ROLE", "DMLC_ROLE", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "examples/lm.py", "--steps", "3", "--text-bytes", "200000", "--eval-every",
                           "100"], cwd=ROOT, env={**env, "ZPS_TEST_TAG": tag}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"steps": 3' in done.stdout
