"""--straggler, --jitter, --kill and --metrics-out: what each injects, and the per-step records checked exactly
against what the workers moved."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from zps.protocol.codecs import make_codec
from zps.protocol.config import JobConfig
from zps.protocol.tensors import encode_entry
from zps.telemetry import stepmetrics
from zps.worker._progress import Disturbance
from zps.worker.optimizer import DistributedOptimizer

from .helpers import ROOT, close_all, finish, local_cluster, run_parallel, start, wait_for_no_tagged

STEPS = 6


def disturbance(rank: int, straggler: str = "", jitter: str = "", kill: str = "") -> tuple[Disturbance, list[float]]:
    made = Disturbance(JobConfig(num_workers=4, straggler=straggler, jitter=jitter, kill=kill), rank)
    slept: list[float] = []
    made.sleep = slept.append
    return made, slept


@pytest.mark.unit
def test_a_straggler_pauses_factor_minus_one_times_its_compute_and_no_one_else_does() -> None:
    slow, slept = disturbance(1, straggler="1:3")
    assert slow.pause(0.02) == pytest.approx(0.04) and slept == [pytest.approx(0.04)]
    other, slept_other = disturbance(0, straggler="1:3")
    assert other.pause(0.02) == 0.0 and slept_other == []


@pytest.mark.unit
def test_jitter_pauses_with_its_probability_the_same_way_on_every_run() -> None:
    runs = []
    for _ in range(2):
        made, slept = disturbance(2, jitter="0.25:0.05")
        runs.append([made.pause(0.0) for _ in range(400)])
    assert runs[0] == runs[1]  # seeded by the rank: a run repeats
    stalls = sum(p == 0.05 for p in runs[0])
    assert set(runs[0]) <= {0.0, 0.05} and 60 <= stalls <= 140, stalls  # 100 expected (binomial sd 8.7)
    assert disturbance(3, jitter="0.25:0.05")[0].pause(0.0) in (0.0, 0.05)


@pytest.mark.unit
def test_kill_fires_at_its_step_only_for_its_worker() -> None:
    made, _ = disturbance(1, kill="worker:1@3,server:0@2")
    fired: list[int] = []
    made.kill = lambda: fired.append(1)
    for steps in (1, 2):
        made.reached(steps)
    assert fired == []
    made.reached(3)
    assert fired == [1]
    other, _ = disturbance(0, kill="worker:1@3")
    other.kill = lambda: fired.append(0)
    other.reached(10)
    assert fired == [1]


@pytest.mark.unit
def test_merge_puts_meta_first_and_every_part_in_time_order(tmp_path: Path) -> None:
    path = str(tmp_path / "m.jsonl")
    stepmetrics.start(path, {"mode": "bsp"})
    a, b = stepmetrics.MetricsFile(path, "worker", 0), stepmetrics.MetricsFile(path, "server", 0)
    for i in range(3):
        a.write("step", step=i, compute=float("nan"))
        b.write("server", step=i)
    a.close()
    b.close()
    assert stepmetrics.merge(path) == 7
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert records[0]["kind"] == "meta" and records[0]["settings"] == {"mode": "bsp"}
    assert [r["t"] for r in records[1:]] == sorted(r["t"] for r in records[1:])
    assert records[1]["compute"] is None  # NaN is not JSON
    assert not stepmetrics.parts_dir(path).exists()


@pytest.mark.cluster
def test_metrics_out_records_every_step_and_its_bytes_exactly(tmp_path: Path) -> None:
    path = str(tmp_path / "metrics.jsonl")
    stepmetrics.start(path, {})
    spec = "topk:ratio=0.25"
    with local_cluster(1, 2, "bsp", codec=spec, compress_min=16, metrics_out=path, straggler="1:2") as cluster:
        clients = cluster.clients()
        models = [nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 2)) for _ in clients]
        for m in models:
            torch.manual_seed(0)
            for p in m.parameters():
                nn.init.normal_(p)

        def train(c) -> None:
            model = models[c.rank]
            opt = DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, client=c)
            x = torch.ones(4, 8) * (c.rank + 1)
            for _ in range(STEPS):
                opt.zero_grad()
                model(x).sum().backward()
                opt.step()

        try:
            run_parallel(train, clients)
        finally:
            close_all(clients)
    stepmetrics.merge(path)
    records = [json.loads(line) for line in Path(path).read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert sorted((r["rank"], r["step"]) for r in steps) == [(w, s) for w in range(2) for s in range(STEPS)]
    # raw: float32 bytes of every parameter each way; logical: the codec's payload (topk on tensors >= 16
    # elements, the rest uncompressed), computed here with the codec itself
    params = list(models[0].parameters())
    raw = sum(4 * p.numel() for p in params)
    codec = make_codec(spec)
    payload = 0
    for p in params:
        flat = torch.randn(p.numel())
        _, bufs = encode_entry(codec if p.numel() >= 16 else make_codec("none"), flat)
        payload += sum(b.nbytes for b in bufs)
    for r in steps:
        assert r["raw_sent"] == raw and r["raw_recv"] == raw, r
        assert r["logical_sent"] == payload, (r, payload)
        assert r["sent"] >= r["logical_sent"] and r["recv"] >= r["logical_recv"] > 0, r
        assert min(r["compute"], r["encode"], r["wait"], r["decode"], r["pause"]) >= 0, r
    # the straggler paused (factor - 1) = 1 x its own compute: its step's compute (the pause included; a sleep
    # never ends early) is at least twice the pause; the other worker never paused
    for r in steps:
        if r["rank"] == 1:
            assert 0 < r["pause"] and r["compute"] >= 2 * r["pause"], r
        else:
            assert r["pause"] == 0.0, r
    ends = {(r["role"], r["rank"]): r for r in records if r["kind"] == "end"}
    assert set(ends) == {("worker", 0), ("worker", 1), ("server", 0)}
    assert ends[("server", 0)]["step"] == STEPS and ends[("server", 0)]["updates"] == STEPS * len(params)
    assert ends[("worker", 0)]["raw_sent"] == STEPS * raw


@pytest.mark.cluster
def test_a_server_kill_fires_once_it_applied_its_step() -> None:
    fired = threading.Event()
    with local_cluster(1, 1, "bsp", kill="server:0@2") as cluster:
        cluster.servers[0].kill = fired.set  # in-process: observe it instead of ending pytest
        client = cluster.clients()[0]
        try:
            w = {"w": torch.zeros(4)}
            client.declare(w, ("SGD", [{"lr": 1.0}]))
            for step in range(2):
                assert not fired.is_set()
                client.push_pull({"w": torch.ones(4)}, w, step=step).result(timeout=30)
            assert fired.wait(10)
        finally:
            close_all([client])


@pytest.mark.cluster
def test_kill_ends_a_real_worker_at_its_step_and_the_job_fails_naming_it(tag: str) -> None:
    proc = start(tag, ["run", "--servers", "1", "--workers", "2", "--progress", "off", "--kill", "worker:1@3",
                       str(ROOT / "tests" / "scripts" / "train_steps.py"), "--steps", "200"])
    code, text = finish(proc, timeout=90)
    assert code != 0, text
    assert "killed at step 3 (--kill)" in text and "worker 1" in text and "SIGKILL" in text, text
    assert wait_for_no_tagged(tag, within=10) == []
