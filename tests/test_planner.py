"""zps plan's model: its arithmetic on configurations small enough to work out by hand."""
from __future__ import annotations

import pytest

from zps.lab.planner import (
    Costs,
    Model,
    Need,
    Setup,
    parse_counts,
    predict,
    servers_needed,
    synthetic_model,
)

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
def test_more_servers_until_their_links_are_within_a_workers_own_work() -> None:
    model = synthetic_model(400_000, 40, compute=0.050)
    key = 4 * 10_000 + HEADER
    own = 0.050 + 40 * key / 125e6  # compute, then its 40 keys through its own 1 Gbit/s link
    # S servers: the busiest holds ceil(40 / S) keys and takes 16 of each through its link
    assert 16 * 14 * key / 125e6 > own >= 16 * 10 * key / 125e6  # S = 3 holds 14 keys, S = 4 holds 10
    need = servers_needed(model, Setup(16, 1, net="bw=1gbit"), FREE)
    assert need == Need(4, True, predict(model, Setup(16, 4, net="bw=1gbit"), FREE).step)
    three = predict(model, Setup(16, 3, net="bw=1gbit"), FREE)
    assert three.servers_bound and three.servers_busy == pytest.approx(16 * 14 * key / 125e6)
    assert three.workers_busy == pytest.approx(own)


@pytest.mark.unit
def test_one_key_too_big_for_any_server_count() -> None:
    model = Model("one big key", (1000, 100, 100), compute=0.0)  # the 1000-element key stays on one server
    need = servers_needed(model, Setup(8, 1, net="bw=1mb"), FREE)
    # from 2 servers the big key has a server of its own: 8 x 4064 B each way at 1 MB/s, not less with 3
    assert need.servers == 2 and not need.enough
    assert need.step == pytest.approx(2 * (8 * (4000 + HEADER) / 1e6))


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
