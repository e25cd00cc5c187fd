"""Soak test: W workers x S servers push and pull for N minutes; checks exactly-once and tracks the servers' RSS.

A ``zps run`` job runs for a fixed wall time; then an exact check that every push of every worker was applied
exactly once, and the servers' resident memory over the run.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--workers 8] [--servers 2] [--mode bsp|asp] [--quick]
                                        [--interval 5] [--json out.json]

``--quick``: 0.5 minutes, 2 workers x 1 server (unless given explicitly).

What the workers do (the low-level ``zps.worker.Client``): every worker declares the same tensors -- 2 Mi + 5
elements (cut into three 4 MiB-or-less chunks, spread over the servers), 64 Ki, 1 Ki + 1 and a one-element control
tensor -- all zeros, SGD with lr 1. Element i of each tensor belongs to worker ``i % W``; worker r's gradient is
``-2**-(r % 8)`` on its own elements and 0 elsewhere (times W in BSP, where the server averages the W pushes of a
step: the division by W is then exact). Every gradient and every partial sum is a power of two times an integer
below 2**24, so float32 holds it exactly, and at the end every element of worker r equals
``(pushes of worker r applied) * 2**-(r % 8)``, exactly. Steps alternate ``push_pull`` and a separate
``push`` + ``pull``.

The run is bounded by time: worker 0 watches the clock and, at the first step after the deadline, pushes -1 (-W in
BSP) into the control tensor; every worker stops after the step whose pulled values show it (in BSP all workers at
the same step, since that pull reflects every push of that step; in ASP each at its next pull). Each worker writes
its push count to a file in a temporary directory, all meet at a barrier, and worker 0 pulls the final values and
compares every element with the count of its owner. The servers' counters (updates applied, duplicates, errors) are
checked against the same counts.

The benchmark's own process samples every ``--interval`` seconds the VmRSS of this job's server processes (its
descendants named ``zps-server-N``, as zps names them). Reported: the RSS after warm-up (the first sample at least
min(10% of the run, 30 s) after the workers started), at the end (the last sample before they stopped), the growth
in percent, and the peak. The exit code is 1 when exactly-once fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402

TENSORS: dict[str, int] = {"big": 2 * 1024 * 1024 + 5, "mid": 64 * 1024, "small": 1024 + 1}  # name -> elements
STOP = "stop"  # the control tensor: worker 0 pushes into it once to end the run
SERVER_PREFIX = "zps-server-"  # /proc/PID/comm of a server (zps.launcher.node.process_name)
MAX_EXACT = 1 << 24  # below this, count * 2**-k is exact in float32
Sample = tuple[float, dict[str, tuple[int, int, int]]]  # (time.time(), {server name: (pid, VmRSS KiB, RssAnon KiB)})


def increment(rank: int) -> float:
    """What one applied push of worker ``rank`` adds to each of its elements (a power of two)."""
    return 2.0 ** -(rank % 8)


# -- the workers (inside zps run) --------------------------------------------------------------------------------
def soak_worker(mode: str, seconds: float, out_dir: Path) -> None:
    import torch

    from zps.worker import Client

    torch.set_num_threads(1)
    with Client.from_env() as client:
        rank, workers = client.rank, client.num_workers
        scale = workers if mode == "bsp" else 1  # BSP applies the average of the step's W pushes
        grads: dict[str, torch.Tensor] = {}
        for name, numel in TENSORS.items():
            grad = torch.zeros(numel)
            grad[rank::workers] = -increment(rank) * scale
            grads[name] = grad
        grads[STOP] = torch.zeros(1)
        stop_grad = torch.full((1,), -1.0 * scale)
        values = {name: torch.zeros(numel) for name, numel in TENSORS.items()}
        values[STOP] = torch.zeros(1)
        client.declare(values, ("SGD", [{"lr": 1.0}]) if rank == 0 else None)
        if client.start_step != 0:
            raise RuntimeError(f"the job starts at step {client.start_step}, not 0: a soak run starts from scratch")
        client.barrier("soak-start")
        started = time.time()
        deadline = time.monotonic() + seconds
        give_up = deadline + max(120.0, seconds)  # a worker that never sees the stop fails rather than runs forever
        step = 0
        while True:
            stopping = rank == 0 and time.monotonic() >= deadline
            if stopping:
                grads[STOP] = stop_grad
            if step % 2 == 0:
                client.push_pull(grads, values, step).result()
            else:
                pushed = client.push(grads, step)
                pulled = client.pull(values, step + 1)
                pushed.result()
                pulled.result()
            step += 1
            if stopping or values[STOP].item() != 0.0:
                break
            if time.monotonic() > give_up:
                raise RuntimeError(f"worker {rank}: no stop signal {give_up - deadline:.0f} s after the deadline")
        ended = time.time()
        if step >= MAX_EXACT:
            raise RuntimeError(f"worker {rank} pushed {step} times: too many for an exact float32 count")
        (out_dir / f"worker-{rank}.json").write_text(json.dumps({"pushes": step, "start": started, "end": ended}))
        client.barrier("soak-end")  # every worker's pushes are acknowledged and its count is on disk
        if rank == 0:
            C.emit_result(check(client, mode, workers, out_dir))


def check(client: Any, mode: str, workers: int, out_dir: Path) -> dict[str, Any]:
    """Worker 0, after every worker stopped: pull the final values and compare them with the counts."""
    import torch

    reports = [json.loads((out_dir / f"worker-{r}.json").read_text()) for r in range(workers)]
    counts = [int(r["pushes"]) for r in reports]
    final = {name: torch.zeros(numel) for name, numel in TENSORS.items()}
    final[STOP] = torch.zeros(1)
    client.pull(final, max(counts)).result()  # BSP: the values after every step (all workers made the same count)
    per_applied = torch.tensor([counts[r] * increment(r) for r in range(workers)], dtype=torch.float64)
    incs = torch.tensor([increment(r) for r in range(workers)], dtype=torch.float64)
    mismatches = 0
    applied: dict[int, list[float]] = {r: [] for r in range(workers)}  # worker -> [min, max] of its decoded counts
    for name, numel in TENSORS.items():
        owner = torch.arange(numel) % workers
        got = final[name].double()
        mismatches += int((got != per_applied[owner]).sum())
        decoded = got / incs[owner]
        for r in range(workers):
            mine = decoded[owner == r]
            if mine.numel() == 0:
                continue  # more workers than elements in this tensor
            low, high = float(mine.min()), float(mine.max())
            applied[r] = [low, high] if not applied[r] else [min(applied[r][0], low), max(applied[r][1], high)]
    stop_value = float(final[STOP].item())
    if stop_value != 1.0:
        mismatches += 1
    stats = client.stats()
    # every key of a server gets one update per step in BSP (the average), one per push in ASP
    per_key = max(counts) if mode == "bsp" else sum(counts)
    servers = [
        {
            "keys": s.get("keys"),
            "pushes_applied": s.get("pushes_applied"),
            "expected_applied": int(s.get("keys", 0)) * per_key,
            "duplicates": s.get("duplicates"),
            "errors": s.get("errors"),
        }
        for s in stats
    ]
    return {
        "counts": counts,
        "applied": applied,
        "mismatches": mismatches,
        "stop_value": stop_value,
        "servers": servers,
        "start": min(float(r["start"]) for r in reports),
        "end": max(float(r["end"]) for r in reports),
        "elements": sum(TENSORS.values()) + 1,
    }


# -- the benchmark's process: server RSS --------------------------------------------------------------------------
def descendants_named(root: int, prefix: str) -> dict[int, str]:
    """{pid: name} of the processes below ``root`` whose /proc/PID/comm starts with ``prefix``."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # ended meanwhile
        pid = int(entry.name)
        close = stat.rfind(")")
        names[pid] = stat[stat.find("(") + 1 : close]
        children.setdefault(int(stat[close + 2 :].split()[1]), []).append(pid)
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if names.get(pid, "").startswith(prefix):
            found[pid] = names[pid]
        todo.extend(children.get(pid, []))
    return found


class RssSampler(threading.Thread):
    """Every ``interval`` seconds: VmRSS and RssAnon (KiB) of each server process of this job, by name
    (zps-server-N)."""

    def __init__(self, interval: float, progress_every: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval = interval
        self.progress_every = progress_every
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        begun = last_print = time.monotonic()
        while True:
            sample: dict[str, tuple[int, int, int]] = {}
            for pid, name in descendants_named(os.getpid(), SERVER_PREFIX).items():
                try:
                    status = C.proc_status_kib(pid)
                    sample[name] = (pid, status["VmRSS"], status.get("RssAnon", 0))
                except (OSError, KeyError):
                    continue  # ended meanwhile
            if sample:
                self.samples.append((time.time(), sample))
                now = time.monotonic()
                if now - last_print >= self.progress_every:
                    last_print = now
                    rss = ", ".join(f"{n} {kib / 1024:.1f} MiB" for n, (_, kib, _) in sorted(sample.items()))
                    print(f"  {now - begun:5.0f} s after launch: RSS {rss} (load {C.load_avg()})", flush=True)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=30)


def rss_summary(samples: list[Sample], start: float, end: float, warmup: float) -> dict[str, dict[str, Any]]:
    """Per server: RSS (MiB) after warm-up, at the end of the workers' run, its growth and peak."""
    out: dict[str, dict[str, Any]] = {}
    names = sorted({name for _, sample in samples for name in sample})
    for name in names:
        series = [(t, s[name]) for t, s in samples if name in s]
        during = [(t, v) for t, v in series if start <= t <= end]
        after_warmup = [(t, v) for t, v in during if t >= start + warmup]
        first = after_warmup[0] if after_warmup else (during[0] if during else series[0])
        last = during[-1] if during else series[-1]
        pids = sorted({pid for _, (pid, _, _) in series})
        warm_mib, end_mib = first[1][1] / 1024, last[1][1] / 1024
        out[name] = {
            "pids": pids,
            "samples": len(during),
            "warm_mib": warm_mib,
            "warm_at_s": first[0] - start,
            "end_mib": end_mib,
            "end_at_s": last[0] - start,
            "warm_anon_mib": first[1][2] / 1024,
            "end_anon_mib": last[1][2] / 1024,
            "peak_mib": max(kib for _, (_, kib, _) in (during or series)) / 1024,
            "growth_pct": (end_mib - warm_mib) / warm_mib * 100 if warm_mib else None,
        }
    return out


# -- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__)
    parser.add_argument("--minutes", type=float, default=None, help="length of the run (default 10; quick 0.5)")
    parser.add_argument("--workers", type=int, default=None, help="default 8 (quick 2)")
    parser.add_argument("--servers", type=int, default=None, help="default 2 (quick 1)")
    parser.add_argument("--mode", choices=["bsp", "asp"], default="bsp", help="consistency mode (default bsp)")
    parser.add_argument("--interval", type=float, default=None, help="seconds between RSS samples (default 5; quick 1)")
    parser.add_argument("--role-worker", action="store_true", help=argparse.SUPPRESS)  # inside zps run
    parser.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role_worker:
        assert args.out_dir is not None
        soak_worker(args.mode, args.seconds, args.out_dir)
        return 0
    minutes = args.minutes if args.minutes is not None else (0.5 if args.quick else 10.0)
    workers = args.workers or (2 if args.quick else 8)
    servers = args.servers or (1 if args.quick else 2)
    interval = args.interval or (1.0 if args.quick else 5.0)
    if minutes <= 0 or workers < 1 or servers < 1 or interval <= 0:
        parser.error("--minutes, --workers, --servers and --interval must be positive")
    seconds = minutes * 60
    started, load_before = time.monotonic(), C.load_avg()
    print(f"soak: {workers} workers x {servers} servers, {args.mode}, {minutes:g} min, RSS every {interval:g} s "
          f"(load {load_before})", flush=True)
    sampler = RssSampler(interval, progress_every=max(10.0, seconds / 10))
    with tempfile.TemporaryDirectory(prefix="zps-soak-") as tmp:
        sampler.start()
        try:
            result = C.run_zps(
                __file__,
                ["--role-worker", "--mode", args.mode, "--seconds", str(seconds), "--out-dir", tmp],
                servers=servers,
                workers=workers,
                mode=args.mode,
                timeout=2 * seconds + 600,
            )
        finally:
            sampler.stop()
    load_end = C.load_avg()
    start, end = float(result["start"]), float(result["end"])
    run_s = end - start
    warmup = min(0.1 * run_s, 30.0)
    rss = rss_summary(sampler.samples, start, end, warmup) if sampler.samples else {}
    counts: list[int] = result["counts"]
    total = sum(counts)
    counter_bad = [i for i, s in enumerate(result["servers"]) if s["pushes_applied"] != s["expected_applied"]]
    ok = result["mismatches"] == 0 and not counter_bad
    exactly_once = "yes" if ok else f"NO ({result['mismatches']} mismatched elements" + (
        f"; update counters off on servers {counter_bad})" if counter_bad else ")")
    names = sorted(rss, key=lambda n: int(n[len(SERVER_PREFIX):]))

    def per_server(field: str, digits: int = 1, sign: bool = False) -> str:
        cells = []
        for n in names:
            v = rss[n][field]
            cells.append("n/a" if v is None else (f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"))
        return " / ".join(cells) or "n/a"

    headers = ["workers", "servers", "mode", "minutes", "total pushes", "pushes/s", "exactly-once",
               "server RSS after warm-up (MiB)", "server RSS at end (MiB)", "growth %", "load avg (start; end)"]
    row = [workers, servers, args.mode, f"{minutes:g}", f"{total:,}", C.fmt(total / run_s if run_s > 0 else None, 1),
           exactly_once, per_server("warm_mib"), per_server("end_mib"), per_server("growth_pct", 2, sign=True),
           f"{load_before}; {load_end}"]
    server_rows = [
        [n, ",".join(map(str, rss[n]["pids"])), rss[n]["samples"],
         f"{rss[n]['warm_mib']:.1f} (at {rss[n]['warm_at_s']:.0f} s)",
         f"{rss[n]['end_mib']:.1f} (at {rss[n]['end_at_s']:.0f} s)", f"{rss[n]['peak_mib']:.1f}",
         f"{rss[n]['warm_anon_mib']:.1f} -> {rss[n]['end_anon_mib']:.1f}",
         "n/a" if rss[n]["growth_pct"] is None else f"{rss[n]['growth_pct']:+.2f}"]
        for n in names
    ]
    worker_rows = [
        [r, f"{c:,}", f"{result['applied'][str(r)][0]:,.0f}..{result['applied'][str(r)][1]:,.0f}"]
        for r, c in enumerate(counts)
    ]
    counter_rows = [
        [i, s["keys"], f"{s['pushes_applied']:,}", f"{s['expected_applied']:,}", s["duplicates"], s["errors"]]
        for i, s in enumerate(result["servers"])
    ]
    md = "\n".join([
        f"### soak: {workers} workers x {servers} servers, {args.mode.upper()}, {minutes:g} min",
        "",
        C.md_table(headers, [row]),
        "",
        f"Every push carries {result['elements']:,} float32 elements ({len(TENSORS) + 1} tensors); pushes/s = pushes "
        f"of all workers / {run_s:.1f} s (first worker start to last worker stop). Exactly-once: every element "
        "compared exactly with its owner's push count (and the control tensor with 1). RSS sampled every "
        f"{interval:g} s; warm-up = the first {warmup:.1f} s; per-server values in server order.",
        "",
        C.md_table(["server", "pid", "samples", "RSS after warm-up MiB", "RSS at end MiB", "peak MiB",
                    "of which anonymous MiB (warm-up -> end)", "growth %"], server_rows),
        "",
        C.md_table(["worker", "pushes made", "pushes applied (min..max over its elements)"], worker_rows),
        "",
        C.md_table(["server", "keys", "updates applied", "expected", "duplicates", "errors"], counter_rows),
    ])
    C.finish(
        "soak",
        md,
        {"workers": workers, "servers": servers, "mode": args.mode, "minutes": minutes, "total_pushes": total,
         "run_seconds": run_s, "exactly_once": ok, "result": result, "rss": rss, "samples": sampler.samples},
        args.json,
        started,
        load_before,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
