"""zps plan's model: its arithmetic on configurations small enough to work out by hand."""
from __future__ import annotations

import pytest

from zps.launcher.planner import Costs, Setup, predict, servers_needed, synthetic_model

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
    assert p.bottleneck.startswith("the links")


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
    assert asp.step == pytest.approx(max(0.010 + 2 * key / 1e6, 4 * 2 * key / 1e6))
    assert asp.step < bsp.step


@pytest.mark.unit
def test_more_servers_until_their_links_are_within_the_compute() -> None:
    model = synthetic_model(400_000, 40, compute=0.050)
    setup = Setup(16, 1, net="bw=1gbit")
    needed = servers_needed(model, setup, FREE)
    # each server's link carries 16 x (its share of 1.6 MB) each way: within 50 ms from 16 x 1.6 MB / 125 MB/s / S
    assert needed is not None and 16 * 1.6e6 / 125e6 / needed <= 0.050 * 1.05
    assert predict(model, Setup(16, needed, net="bw=1gbit"), FREE).servers_busy <= 0.050
    assert predict(model, Setup(16, needed - 1, net="bw=1gbit"), FREE).servers_busy > 0.050
