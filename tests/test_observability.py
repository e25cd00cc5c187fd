"""Observability: Prometheus metrics that count what really crossed, ``zps top`` on a live job, Chrome traces that
hold every step, straggler detection, the launcher's progress lines and summary."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from zps.protocol.codecs import make_codec
from zps.protocol.progress import clean_report
from zps.protocol.tensors import encode_entry
from zps.telemetry import live
from zps.telemetry.monitor import Monitor

from .helpers import ROOT, ZPS, finish, free_ports, local_cluster, start, wait_for_line, wait_for_no_tagged

STEPS = ROOT / "tests" / "scripts" / "train_steps.py"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of ``http://127.0.0.1:port/metrics``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (0 when there is none)."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.mark.cluster
@pytest.mark.parametrize("shm, codec", [(False, ""), (True, ""), (False, "topk:ratio=0.1")])
def test_metrics_count_exactly_what_the_worker_sent(shm: bool, codec: str) -> None:
    base = free_ports(2)
    with local_cluster(1, 1, "bsp", codec=codec, compress_min=64, metrics_port=base) as cluster:
        (client,) = cluster.clients(shm=shm)
        try:
            tensors = {"w": torch.randn(2000), "b": torch.randn(10)}
            client.declare(tensors, ("SGD", [{"lr": 0.1}]))
            outs = {k: torch.empty_like(v) for k, v in tensors.items()}
            client.pull(outs, 0).result()
            before = scrape(base + 1)
            grads = [{k: torch.randn_like(v) for k, v in tensors.items()} for _ in range(8)]
            for step in range(5):
                client.push_pull(grads[step], outs, step).result()
            for step in range(5, 8):
                client.push(grads[step], step).result()
                client.pull(outs, step + 1).result()
            after = scrape(base + 1)
            delta = {kind: value(after, "zps_server_requests_total", kind=kind)
                     - value(before, "zps_server_requests_total", kind=kind) for kind in ("push_pull", "push", "pull")}
            assert delta == {"push_pull": 5, "push": 3, "pull": 3}  # one message per call: one server, small keys
            for kind in ("init", "push_pull", "push", "pull"):  # every request answered, and observed once
                assert value(after, "zps_server_request_duration_seconds_count", kind=kind) == value(
                    after, "zps_server_requests_total", kind=kind) > 0, kind
            # wire bytes: what the worker's sockets moved, plus the shared-memory path
            engine = client._engine
            assert value(after, "zps_server_wire_bytes_total", direction="in", path="tcp") == engine.sent_bytes
            assert value(after, "zps_server_wire_bytes_total", direction="out", path="tcp") == engine.recv_bytes
            assert value(after, "zps_server_wire_bytes_total", direction="in", path="shm") == client.progress.shm_sent
            assert value(after, "zps_server_wire_bytes_total", direction="out", path="shm") == client.progress.shm_recv
            assert (client.progress.shm_sent > 0) == shm
            # logical bytes: the float32 size of each push; encoded: what the codec made of it
            pushed = 8 * 4 * 2010
            logical_in = value(after, "zps_server_logical_bytes_total", direction="in") - value(
                before, "zps_server_logical_bytes_total", direction="in")
            assert logical_in == pushed
            encoded_w = value(after, "zps_server_encoded_bytes_total", direction="in", tensor="w") - value(
                before, "zps_server_encoded_bytes_total", direction="in", tensor="w")
            if codec:
                reference = make_codec(codec)  # encodes exactly what the worker's fresh codec did
                expected = sum(sum(b.nbytes for b in encode_entry(reference, g["w"])[1]) for g in grads)
                assert encoded_w == expected < 8 * 4 * 2000
            else:
                assert encoded_w == 8 * 4 * 2000
            # the worker's own figures, served by the coordinator from its heartbeats
            deadline = time.monotonic() + 15
            while True:
                coordinator = scrape(base)
                got = (value(coordinator, "zps_worker_wire_bytes_total", direction="out"),
                       value(coordinator, "zps_worker_logical_bytes_total", direction="out"))
                want = (engine.sent_bytes + client.progress.shm_sent, client.progress.logical_sent)
                if got == want:
                    break
                assert time.monotonic() < deadline, (got, want)
                time.sleep(0.05)  # polling another thread's heartbeat, bounded by the deadline
            assert value(coordinator, "zps_coordinator_members", role="server", state="running") == 1
        finally:
            client.close()


@pytest.mark.unit
def test_a_report_from_the_network_keeps_only_well_formed_fields() -> None:
    times = [0.1, float("inf"), "a", -1, 0.2] * 100
    hostile = {"step": -1, "samples": 1 << 70, "loss": float("nan"), "wait": "x", "times": times, "rss": True,
               "sent": 10, "extra": {"a": 1}}
    kept = [t for t in times[-64:] if isinstance(t, float) and 0 <= t < 1e6]  # the newest 64, the sane ones
    assert clean_report(hostile) == {"sent": 10, "times": kept} and kept
    assert clean_report([1, 2]) == {} and clean_report(None) == {}


@pytest.mark.unit
def test_the_straggler_check_flags_a_slow_worker_and_only_it() -> None:
    monitor = Monitor(factor=1.5)
    for rank in range(4):
        monitor.joined("worker", rank, f"host{rank}", 100 + rank)
    for _ in range(3):  # balanced, with noise
        for rank in range(4):
            monitor.report("worker", rank, {"step": 1, "times": [0.05 + 0.004 * rank, 0.052, 0.049]})
    assert not any(r["straggler"] for r in monitor.snapshot()["members"])
    monitor.report("worker", 2, {"step": 2, "times": [0.1] * 10})  # 2x the others
    flags = {r["rank"]: r["straggler"] for r in monitor.snapshot()["members"]}
    assert flags == {0: False, 1: False, 2: True, 3: False}
    monitor.report("worker", 2, {"step": 3, "times": [0.05] * 10})
    assert not any(r["straggler"] for r in monitor.snapshot()["members"])
    tiny = Monitor(factor=1.5)  # 2x of a few milliseconds is scheduling noise, not a straggler
    for rank in range(2):
        tiny.joined("worker", rank, "h", rank)
        tiny.report("worker", rank, {"times": [0.003 * (1 + rank)] * 5})
    assert not any(r["straggler"] for r in tiny.snapshot()["members"])


@pytest.mark.unit
def test_progress_lines_and_the_summary_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    status: dict[str, Any] = {"uptime": 12.0, "members": [
        {"role": "server", "rank": 0, "host": "a", "state": "running", "updates": 40, "keys": 4, "rss": 2_000_000,
         "sent_per_s": 1500.0, "recv_per_s": 2500.0, "sent": 9000, "recv": 8000, "active": 10.0},
        {"role": "worker", "rank": 1, "host": "b", "state": "running", "step": 20, "step_per_s": 2.0,
         "loss": 0.25, "samples": 640, "samples_per_s": 64.0, "step_time": 0.2, "straggler": True, "rss": 1000,
         "sent": 100, "recv": 200, "active": 10.0, "steps_run": 20, "samples_run": 640}]}
    assert live.line(status["members"][1]) == (
        "worker 1 (b): running, step 20 (2.00/s), loss 0.2500, 64.0 samples/s, step time 0.200 s, sent 0 B/s, "
        "received 0 B/s, memory 1.0 kB, STRAGGLER")
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        monkeypatch.setattr(live, "LINE_INTERVAL", 0.05)
        progress = live.LiveView(lambda: status, "auto", out)  # a file: lines
        assert progress.mode == "lines"
        progress.start()
        deadline = time.monotonic() + 10
        while out_path.read_text().count("[zps] worker 1") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)  # polling the file another thread writes, bounded
        progress.close()
    text = out_path.read_text()
    assert ("[zps] server 0 (a): running, 40 updates (one per key and step; 4 keys), sent 1.5 kB/s, received 2.5 kB/s, "
            "memory 2.0 MB") in text
    table = text[text.index("zps: the job's roles"):]
    assert re.search(r"worker 1 .* STRAGGLER .* 20 .* 0\.2500 .* 64\.0 .* 2\.00", table), table


def _steps_of(events: list[dict[str, Any]], pid: int, name: str) -> set[int]:
    return {e["args"]["step"] for e in events if e["pid"] == pid and e["name"] == name and e["ph"] == "X"}


@pytest.mark.cluster
def test_a_trace_holds_every_step_of_every_worker_and_server_and_a_balanced_run_flags_nobody(
        tag: str, tmp_path: Path) -> None:
    trace_dir = tmp_path / "trace"
    proc = start(tag, ["run", "--servers", "2", "--workers", "2", "--trace", str(trace_dir), "--heartbeat-interval",
                       "0.2", str(STEPS), "--steps", "20", "--step-time", "0.05"])
    code, text = finish(proc, timeout=120)
    assert code == 0, text
    assert "straggler" not in text.lower(), text  # balanced: nobody is flagged
    assert f"trace: {trace_dir / 'trace.json'}" in text
    doc = json.loads((trace_dir / "trace.json").read_text())
    events = doc["traceEvents"]
    for e in events:  # what the Chrome trace format asks of each event
        assert isinstance(e["name"], str) and e["ph"] in ("X", "M") and isinstance(e["pid"], int)
        if e["ph"] == "X":
            assert isinstance(e["ts"], float) and e["dur"] >= 0 and isinstance(e["tid"], int)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"server 0", "server 1", "worker 0", "worker 1"}
    for pid in (1001, 1002):  # workers
        for span in ("compute", "forward", "backward", "push_pull", "encode"):
            assert _steps_of(events, pid, span) == set(range(20)), (pid, span)
        assert sum(e["pid"] == pid and e["name"] == "decode" for e in events) >= 20  # a reply of each server a step
    for pid in (1, 2):  # servers: each applied a push of every step
        assert _steps_of(events, pid, "push") == set(range(20)), pid
        assert any(e["pid"] == pid and e["name"] == "apply" for e in events)
    assert wait_for_no_tagged(tag, within=10) == []


@pytest.mark.cluster
def test_a_two_times_straggler_is_flagged_within_ten_steps(tag: str, tmp_path: Path) -> None:
    proc = start(tag, ["run", "--servers", "1", "--workers", "3", "--heartbeat-interval", "0.2", str(STEPS),
                       "--steps", "25", "--step-time", "0.05", "--slow-rank", "1", "--slow-factor", "2"])
    code, text = finish(proc, timeout=120)
    assert code == 0, text
    flagged = [i for i, line in enumerate(text.splitlines()) if "straggler: worker" in line]
    assert flagged, text
    assert all("straggler: worker 1 on " in text.splitlines()[i] for i in flagged), text  # only the slow one
    steps_before = sum(1 for line in text.splitlines()[: flagged[0]] if line.startswith("[worker 1] STEP"))
    assert steps_before <= 10, text
    table = text[text.index("zps: the job's roles"):]
    assert len(flagged) == 1  # logged once
    assert "worker 1" in table
    assert wait_for_no_tagged(tag, within=10) == []


@pytest.mark.cluster
def test_zps_top_shows_every_role_of_a_live_cluster_within_two_seconds(tag: str) -> None:
    proc = start(tag, ["run", "--servers", "2", "--workers", "2", "--progress", "off", str(ROOT / "tests" / "scripts"
                                                                                           / "train_forever.py")])
    try:
        head = wait_for_line(proc, "zps top --coordinator", timeout=60)
        coordinator = re.search(r"zps top --coordinator (\S+)\)", head).group(1)  # type: ignore[union-attr]
        wait_for_line(proc, "TRAINING", timeout=90)
        master, slave = pty.openpty()
        started = time.monotonic()
        top = subprocess.Popen([*ZPS, "top", "--coordinator", coordinator, "--interval", "0.2"], stdin=slave,
                               stdout=slave, stderr=slave, env={**os.environ, "ZPS_TEST_TAG": tag, "COLUMNS": "160"},
                               cwd=ROOT)
        os.close(slave)
        seen = b""
        try:
            roles = [b"server 0", b"server 1", b"worker 0", b"worker 1"]
            while not all(r in seen for r in roles):
                left = started + 10 - time.monotonic()
                assert left > 0, seen.decode(errors="replace")
                if select.select([master], [], [], left)[0]:
                    seen += os.read(master, 65536)
            elapsed = time.monotonic() - started
            print(f"zps top showed every role {elapsed:.2f}s after it started")
            assert elapsed < 2.0, elapsed
            assert b"running" in seen
        finally:
            top.send_signal(signal.SIGINT)
            top.wait(timeout=10)
            os.close(master)
        proc.send_signal(signal.SIGINT)  # the launcher ends the job, and prints its summary on the way out
        code, text = finish(proc, timeout=60)
        assert "zps: the job's roles" in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
    assert wait_for_no_tagged(tag, within=10) == []
