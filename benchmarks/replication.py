"""What ``--replicas`` costs: training throughput and server memory with one backup of every chunk, beside none.

    .venv/bin/python benchmarks/replication.py [--quick] [--params 8000000] [--steps 40] [--runs 3] [--json out.json]

A BSP job of 3 servers x 2 workers, Adam on the servers: each worker declares ``--params`` float32 parameters in
tensors of 1M elements and pushes and pulls all of them for ``--steps`` steps (fixed gradients: the work is the
transfer, the aggregation and the optimizer step, the part replication multiplies). Worker 0 times the steps after
two of warm-up and reads every server's VmRSS and RssAnon from /proc at the end.

Training throughput: examples/lm.py (the 2.6M-parameter transformer, 4 windows per worker per step), the same
3 x 2 job, ``--lm-steps`` steps, with and without ``--replicas 1``, steps per second from its own summary.

Four configurations of the push/pull job, each ``--runs`` times, medians: no replicas (shared memory on, the
default); no replicas with shared memory off (``--replicas`` turns it off: this isolates what the backups
themselves cost); ``--replicas 1``; ``--replicas 1 --secure`` (CurveZMQ on every socket, servers' own keys).
The memory floor of a server is (R + 1) x its share x 3 x 4 bytes (values, Adam's two moments); an idle process
with the server's imports is measured in the same run and subtracted ("net").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from benchmarks.memory import idle_rss_kib  # noqa: E402

TENSOR = 1 << 20
SERVERS, WORKERS = 3, 2
MIB = 1 << 20


def zps_worker(numel: int, steps: int) -> None:
    import torch

    from zps import worker

    torch.set_num_threads(1)
    client = worker.init()
    sizes = [TENSOR] * (numel // TENSOR) + ([numel % TENSOR] if numel % TENSOR else [])
    values = {f"p{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    client.declare(values, ("Adam", [{"lr": 1e-3}]))
    grads = {name: torch.full_like(v, 1e-3 * (client.rank + 1)) for name, v in values.items()}
    times = []
    for step in range(steps):
        start = time.perf_counter()
        client.push_pull(grads, values, step).result()
        times.append(time.perf_counter() - start)
    result: dict = {"numel": sum(sizes), "step_times": times}
    if client.rank == 0:
        from zps.telemetry.top import StatusClient

        status = StatusClient(client.config.coordinator, client.config.secrets)  # it knows every member's pid
        pids = [m["pid"] for m in status.status()["members"] if m["role"] == "server"]
        status.close()
        result["servers"] = [C.proc_status_kib(pid) for pid in pids]
    client.barrier("bench-end")  # every worker's steps are done before the servers go
    if client.rank == 0:
        C.emit_result(result)
    worker.shutdown()


def lm_rate(steps: int, extra: list[str]) -> float:
    """Steps per second of examples/lm.py in a 3 x 2 BSP job (its own wall time, after start-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lm.json"
        argv = [*C.zps_command(), "run", "--servers", str(SERVERS), "--workers", str(WORKERS), *extra,
                str(C.ROOT / "examples" / "lm.py"), "--steps", str(steps), "--batch-size", "4", "--eval-every",
                str(steps), "--out", str(out)]
        done = subprocess.run(argv, cwd=C.ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stdout[-2000:]}")
        summary = json.loads(out.read_text())
        return summary["steps"] / summary["wall_seconds"]


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument("--params", type=int, default=None, help="float32 parameters (default 8M; quick 2M)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 40; quick 15)")
    parser.add_argument("--runs", type=int, default=None, help="runs per configuration (default 3; quick 1)")
    parser.add_argument("--lm-steps", type=int, default=None, help="steps of examples/lm.py (default 30; quick 10)")
    parser.add_argument("--role-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    numel = args.params or (2_000_000 if args.quick else 8_000_000)
    steps = args.steps or (15 if args.quick else 40)
    runs = args.runs or (1 if args.quick else 3)
    lm_steps = args.lm_steps or (10 if args.quick else 30)
    if args.role_worker:
        zps_worker(numel, steps)
        return {}

    started, load_before = time.monotonic(), C.load_avg()
    lm: dict[str, list[float]] = {"no replicas": [], "--replicas 1": []}
    lm_loads = []
    for rep in range(runs):
        lm_loads.append(C.load_avg())
        for name, extra in (("no replicas", []), ("--replicas 1", ["--replicas", "1"])):
            lm[name].append(lm_rate(lm_steps, extra))
            print(f"lm run {rep + 1}/{runs} {name}: {lm[name][-1]:.2f} steps/s", flush=True)
    lm_ratio = C.median(lm["--replicas 1"]) / C.median(lm["no replicas"])
    idle = idle_rss_kib("import torch, zmq, msgpack, numpy\nimport ps.server")["VmRSS"] * 1024
    _, shm_off, _ = C.shm_option()
    configs = [("no replicas", {}, [], 0), ("no replicas, no shared memory", shm_off, [], 0),
               ("--replicas 1", {}, ["--replicas", "1"], 1),
               ("--replicas 1 --secure", {}, ["--replicas", "1", "--secure"], 1)]
    measured: dict[str, dict] = {}
    for rep in range(runs):
        for name, env, extra, replicas in configs:
            load = C.load_avg()
            result = C.run_zps(__file__, ["--role-worker", "--params", str(numel), "--steps", str(steps)],
                               servers=SERVERS, workers=WORKERS, env={"OMP_NUM_THREADS": "1", **env},
                               zps_args=extra, timeout=900)
            timed = result["step_times"][2:]
            rate = len(timed) / sum(timed)
            share = 3 * 4 * result["numel"] / SERVERS * (replicas + 1)
            rss = [s["VmRSS"] * 1024 for s in result["servers"]]
            m = measured.setdefault(name, {"rates": [], "net": [], "anon": [], "loads": [], "floor": share})
            m["rates"].append(rate)
            m["net"].append(max(r - idle for r in rss))
            m["anon"].append(max(s.get("RssAnon", 0) * 1024 for s in result["servers"]))
            m["loads"].append(load)
            print(f"run {rep + 1}/{runs} {name}: {rate:.2f} steps/s, busiest server {max(rss) / MIB:.0f} MiB "
                  f"(load {load})", flush=True)
    base = C.median(measured["no replicas"]["rates"])
    base_noshm = C.median(measured["no replicas, no shared memory"]["rates"])
    rows = []
    net_base = C.median(measured["no replicas, no shared memory"]["net"])
    for name, *_ in configs:
        m = measured[name]
        rate, net = C.median(m["rates"]), C.median(m["net"])
        rows.append([name, C.fmt(rate), f"{rate / base:.2f}x", f"{rate / base_noshm:.2f}x",
                     C.fmt(m["floor"] / MIB, 0), C.fmt(net / MIB, 0), f"{net / net_base:.2f}x",
                     C.fmt(C.median(m["anon"]) / MIB, 0), "; ".join(m["loads"])])
    rep_rate = C.median(measured["--replicas 1"]["rates"])
    mem_ratio = C.median(measured["--replicas 1"]["net"]) / net_base
    markdown = "\n".join([
        f"### replication: {SERVERS} servers x {WORKERS} workers, BSP, Adam, {numel / 1e6:.0f}M float32 parameters "
        f"in 1M-element tensors, {steps} steps, medians of {runs} runs",
        "",
        C.md_table(["configuration", "steps/s", "vs no replicas", "vs no replicas, no shm",
                    "server floor MiB", "busiest server RSS net MiB", "vs no replicas, no shm", "RssAnon MiB",
                    "load at start"], rows),
        "",
        f"examples/lm.py, {lm_steps} steps: {C.fmt(C.median(lm['no replicas']))} steps/s without replicas, "
        f"{C.fmt(C.median(lm['--replicas 1']))} with --replicas 1: **{lm_ratio:.2f}x** (target >= 0.7x: "
        f"{'met' if lm_ratio >= 0.7 else 'MISSED'}; load {'; '.join(lm_loads)}).",
        "",
        f"Push/pull only (no compute: the worst case): --replicas 1 runs at {rep_rate / base:.2f}x of no replicas, "
        f"{rep_rate / base_noshm:.2f}x of no replicas without shared memory. Memory: the busiest server's resident "
        f"set net of an idle process with the server's imports is {mem_ratio:.2f}x that of no replicas (the floor "
        "doubles: target <= 2 x 1.1 = 2.2x: " + ("met" if mem_ratio <= 2.2 else "MISSED") + ").",
    ])
    return C.finish("replication", markdown, {"measured": measured, "lm": lm, "lm_ratio": lm_ratio,
                                              "memory_ratio": mem_ratio}, args.json, started, load_before)


if __name__ == "__main__":
    main()
