"""A cluster simulated on one machine: step time, server CPU and memory per process against the number of workers.

    .venv/bin/python benchmarks/scale.py [--workers 1 2 4 8 16 32] [--servers 4] [--steps 30] [--json out.json]

For each W: ``zps run --servers S --workers W examples/digits.py`` (BSP, batch 8 per worker, enough epochs for
``--steps`` steps) with ``--metrics-out``. From its records: the median step time of the workers (the time between
consecutive steps of one worker, over all workers and steps after the first 3), the servers' CPU seconds per step
(their ``end`` records' ``cpu`` over the steps applied) and their CPU utilisation over the run; while the job runs
this process reads every process's proportional set size (PSS: shared pages -- torch's, forked from the zygote --
split among the processes that share them) from /proc, the memory each process really adds. Beside each measured
W, ``zps plan``'s prediction for the same configuration, and its predictions for 64-1024 workers.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from tests.sshd import descendants  # noqa: E402

TRAIN_SAMPLES = 1437  # digits' training split (80% of 1797)
BATCH = 8


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def sample_memory(root: int, stop: threading.Event, seen: list[list[int]], servers: list[list[int]]) -> None:
    """Every 2 s until ``stop``: the PSS of each process of the job (the launcher's included), and of its servers."""
    while not stop.wait(2.0):
        pids = [root, *descendants(root)]
        seen.append([pss_kib(p) for p in pids])
        servers.append([pss_kib(p) for p in pids if comm(p).startswith("zps-server")])


def run(workers: int, servers: int, steps: int, out: Path, timeout: float, bsp_sum: str = "rank") -> dict[str, Any]:
    per_epoch = max(1, math.ceil(TRAIN_SAMPLES / workers / BATCH))
    epochs = max(1, math.ceil(steps / per_epoch))
    metrics = out / f"w{workers}.jsonl"
    argv = [*C.zps_command(), "run", "--servers", str(servers), "--workers", str(workers), "--progress", "off",
            "--bsp-sum", bsp_sum, "--metrics-out", str(metrics), "examples/digits.py", "--epochs", str(epochs),
            "--batch-size", str(BATCH)]
    began = time.monotonic()
    proc = subprocess.Popen(argv, cwd=C.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    stop, memory, server_memory = threading.Event(), list[list[int]](), list[list[int]]()
    sampler = threading.Thread(target=sample_memory, args=(proc.pid, stop, memory, server_memory), daemon=True)
    sampler.start()
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise RuntimeError(f"W={workers}: no end within {timeout:.0f}s") from None
    finally:
        stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"W={workers} exited {proc.returncode}:\n{output[-3000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    by_worker: dict[int, list[float]] = {}
    for r in records:
        if r["kind"] == "step" and r["role"] == "worker":
            by_worker.setdefault(r["rank"], []).append(r["t"])
    gaps = [b - a for ts in map(sorted, by_worker.values()) for a, b in list(zip(ts, ts[1:], strict=False))[3:]]
    ends = [r for r in records if r["kind"] == "end" and r["role"] == "server"]
    applied = max((r.get("step", 0) for r in ends), default=0) or 1
    server_cpu = [r.get("cpu", 0.0) for r in ends]
    peak = max(memory, key=sum, default=[0])
    return {"workers": workers, "servers": servers, "steps": applied, "wall": time.monotonic() - began,
            "step_time": statistics.median(gaps) if gaps else float("nan"),
            "server_cpu_per_step": statistics.mean(server_cpu) / applied if server_cpu else float("nan"),
            "processes": len(peak), "pss_mib_per_process": statistics.median(peak) / 1024 if peak else 0.0,
            "pss_mib_total": sum(peak) / 1024,
            "server_pss_mib_peak": max((max(s) for s in server_memory if s), default=0) / 1024}


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--compare-sums", type=int, default=0, metavar="ROUNDS",
                        help="instead: at each W, ROUNDS interleaved runs summing BSP steps in rank order (the "
                             "default) and in arrival order (--bsp-sum arrival): step time and server memory")
    args = parser.parse_args()
    started, load_before = time.monotonic(), C.load_avg()
    if args.compare_sums:
        compare_sums(args, started, load_before)
        return
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="zps-scale-") as tmp:
        for w in args.workers:
            r = run(w, args.servers, args.steps, Path(tmp), args.timeout)
            results.append(r)
            rows.append([str(w), str(args.servers), str(r["steps"]), f"{r['step_time'] * 1e3:.1f}",
                         f"{r['server_cpu_per_step'] * 1e3:.2f}", str(r["processes"]),
                         f"{r['pss_mib_per_process']:.0f}", f"{r['pss_mib_total']:.0f}", f"{r['wall']:.0f}",
                         C.load_avg().split()[0]])
            print(rows[-1], flush=True)
    table = C.md_table(["W", "S", "steps", "step ms (median)", "server CPU ms/step", "processes",
                        "PSS MiB/process (median)", "PSS MiB total", "wall s", "load"], rows)
    C.finish("scale", table, {"results": results}, args.json, started, load_before)


def compare_sums(args: Any, started: float, load_before: str) -> None:
    """Rank-order against arrival-order sums, interleaved: medians of step time and of the servers' peak PSS."""
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="zps-scale-") as tmp:
        for w in args.workers:
            seen: dict[str, list[dict[str, Any]]] = {"rank": [], "arrival": []}
            loads = []
            for _ in range(args.compare_sums):
                for order in ("rank", "arrival"):
                    seen[order].append(run(w, args.servers, args.steps, Path(tmp), args.timeout, order))
                    loads.append(C.load_avg().split()[0])
            med = {o: (statistics.median(r["step_time"] for r in rs), statistics.median(r["server_pss_mib_peak"]
                                                                                        for r in rs))
                   for o, rs in seen.items()}
            rows.append([str(w), str(args.servers), f"{med['rank'][0] * 1e3:.1f}", f"{med['arrival'][0] * 1e3:.1f}",
                         f"{med['rank'][0] / med['arrival'][0]:.2f}x", f"{med['rank'][1]:.0f}",
                         f"{med['arrival'][1]:.0f}", f"{min(loads)}-{max(loads)}"])
            results.append({"workers": w, "runs": seen})
            print(rows[-1], flush=True)
    table = C.md_table(["W", "S", "step ms, rank order", "step ms, arrival", "rank / arrival",
                        "server peak PSS MiB, rank", "arrival", "load"], rows)
    C.finish("scale: BSP sums in rank order against arrival order", table, {"results": results}, args.json,
             started, load_before)


if __name__ == "__main__":
    main()
