"""The live table and zps top at a terminal's width, what a server's step column counts, the job summary's rates after
a resume, and a command's errors with its own usage."""
from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from rich.console import Console

from zps.launcher.cli import main as zps_main
from zps.protocol.progress import clean_report
from zps.telemetry import live, monitor
from zps.telemetry.monitor import Monitor
from zps.telemetry.top import view

from .helpers import local_cluster


def status(server_step: bool = False) -> dict[str, Any]:
    members: list[dict[str, Any]] = []
    for rank in range(2):
        members.append({"role": "server", "rank": rank, "host": "10.0.0.12", "state": "running", "updates": 345,
                        "keys": 5, "rss": 310_000_000, "sent_per_s": 1.5e6, "recv_per_s": 2.5e6,
                        **({"step": 69} if server_step else {})})
    for rank in range(4):
        members.append({"role": "worker", "rank": rank, "host": "10.0.0.13", "state": "running", "step": 69,
                        "step_per_s": 3.31, "loss": 2.3456, "samples": 6400, "samples_per_s": 1234.5,
                        "step_time": 0.123, "straggler": rank == 1, "rss": 420_000_000, "sent_per_s": 1.2e7,
                        "recv_per_s": 1.1e7})
    return {"uptime": 12.0, "members": members, "state": "running", "mode": "bsp", "num_servers": 2,
            "num_workers": 4}


def render(renderable: Any, width: int) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width).print(renderable)
    return out.getvalue().splitlines()


def headers(lines: list[str]) -> list[str]:
    return [h.strip() for h in lines[1].strip("┃").split("┃")]


@pytest.mark.unit
@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_table_fits_the_terminal_with_every_header_named_and_nothing_cut(width: int) -> None:
    lines = render(live.table(status(), width=width), width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    assert "…" not in "".join(lines)  # no cell or header cut short ("ser…", "wor…")
    heads = headers(lines)
    assert heads[:4] == ["role", "state", "step", "loss"] and all(heads)  # no column without a header
    assert any("STRAGGLER" in line and "w1" in line for line in lines)  # the flag is in the state column
    at80 = headers(render(live.table(status(), width=80), 80))
    assert at80 == ["role", "state", "step", "loss", "st/s", "sent", "recv", "step t"]


@pytest.mark.unit
def test_columns_go_in_the_stated_order_as_the_terminal_narrows() -> None:
    shown: list[list[str]] = []
    narrowest = len(render(live.table(status(), width=1), 200)[0])  # every column dropped that may be
    for width in range(200, narrowest - 1, -1):
        heads = headers(render(live.table(status(), width=width), width))
        if not shown or heads != shown[-1]:
            shown.append(heads)
    assert shown[0] == ["role", "host", "state", "step", "loss", "samples/s", "steps/s", "sent", "received",
                        "step time", "memory"]
    assert shown[1] == ["role", "state", "step", "loss", "samples/s", "steps/s", "sent", "received", "step time",
                        "memory"]  # the host first
    assert shown[2] == ["role", "state", "step", "loss", "smp/s", "st/s", "sent", "recv", "step t", "mem"]
    gone = [sorted(set(a) - set(b)) for a, b in zip(shown[2:], shown[3:], strict=False)]
    assert gone == [["mem"], ["smp/s"], ["recv", "sent"], ["step t"], ["loss"]]  # the order of live.FIT_ORDER
    assert shown[-1] == ["role", "state", "step", "st/s"]
    assert headers(render(live.table(status()), 300))[1] == "host"  # no width: everything


@pytest.mark.unit
def test_a_servers_step_column_says_what_it_counts() -> None:
    wide = "\n".join(render(live.table(status(), width=200), 200))
    assert wide.count("345 key updates") == 2
    assert "345 key-upd" in "\n".join(render(live.table(status(), width=80), 80))
    assert "345 updates (one per key and step; 5 keys)" in live.line(status()["members"][0])
    counted = "\n".join(render(live.table(status(server_step=True), width=200), 200))
    assert "key updates" not in counted and counted.count("│ 69 ") + counted.count(" 69 │") >= 6  # steps, like workers
    assert live.line(status(server_step=True)["members"][0]).startswith("server 0 (10.0.0.12): running, step 69")


@pytest.mark.unit
def test_zps_top_fits_80_columns() -> None:
    lines = render(view(status(), "127.0.0.1:29600", width=80), 80)
    assert lines[0].startswith("zps job at 127.0.0.1:29600: running, bsp, 2 servers x 4 workers")
    assert all(len(line) <= 80 for line in lines) and "…" not in "".join(lines)
    assert lines[-1] == "stragglers: worker 1 (10.0.0.13)"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.unit
def test_the_summary_counts_only_the_steps_this_run_did(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(monitor, "time", clock)
    m = Monitor()
    m.joined("worker", 0, "h", 1)
    m.report("worker", 0, {"step": 0, "samples": 0})  # resumed at 69: no step of this run yet
    clock.now += 2.0
    m.report("worker", 0, {"step": 70, "samples": 8})  # its first step: the checkpoint's 69 and one
    clock.now += 10.0
    m.report("worker", 0, {"step": 103, "samples": 272})  # 33 steps in 10 s
    (row,) = m.snapshot()["members"]
    assert (row["active"], row["steps_run"], row["samples_run"]) == (10.0, 33, 264)
    lines = render(live.table(m.snapshot(), final=True, width=200), 200)
    assert "3.30" in lines[3] and "26.4" in lines[3] and "10.30" not in lines[3]  # not 103 steps in 10 s
    fresh = Monitor()
    fresh.joined("server", 0, "h", 2)
    fresh.report("server", 0, {"updates": 0})  # a server counts from its first report
    clock.now += 5.0
    fresh.report("server", 0, {"updates": 50})
    assert fresh.snapshot()["members"][0]["active"] == 5.0


@pytest.mark.unit
@pytest.mark.parametrize("argv, usage, says", [
    (["run", "--servers", "0", "examples/digits.py"], "usage: zps run ",
     "zps run: error: ZPS_NUM_SERVERS (--servers)=0"),
    (["run", "no_such_script.py"], "usage: zps run ", "zps run: error: script 'no_such_script.py' not found"),
    (["k8s", "--image", "i", "--mode", "ssp", "x.py"], "usage: zps k8s ", "zps k8s: error: "),
])
def test_a_commands_error_prints_its_own_usage(argv: list[str], usage: str, says: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        zps_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(usage) and says in err, err
    assert "usage: zps [-h]" not in err


@pytest.mark.cluster  # (a coordinator and servers in threads)
def test_a_servers_heartbeat_carries_its_step() -> None:
    with local_cluster(2, 1, "bsp") as cluster:
        (client,) = cluster.clients()
        try:
            tensors = {"w": torch.randn(2000), "b": torch.randn(10)}
            client.declare(tensors, ("SGD", [{"lr": 0.1}]))
            outs = {k: torch.empty_like(v) for k, v in tensors.items()}
            for step in range(3):
                client.push_pull({k: torch.ones_like(v) for k, v in tensors.items()}, outs, step).result()
            reports = [server._loop.metrics.report() for server in cluster.servers if server._loop is not None]
        finally:
            client.close()
    assert [clean_report(r).get("step") for r in reports] == [3, 3]  # 3 steps on each server, whatever its keys
