"""Codec overhead on unshaped loopback: step time of a compressed run against an uncompressed one, same run.

The CNN of benchmarks/training.py (0.23M parameters in 8 tensors: 4 weights compressed, 4 biases under
``--compress-min`` uncompressed), SGD, BSP, 2 workers x 1 server (``--servers 2`` for two), the same seed and
fixed batches in memory for every configuration. Each configuration is a fresh ``zps run``; configurations are
started in turn, ``--rounds`` times (interleaved, so load drifts hit all alike). Worker 0 times every step after
the warm-up; the table gives the median step over all rounds and its ratio to ``none``'s (the target of issue 13:
<= 1.3x for topk 1% + error feedback).

    python benchmarks/codec_overhead.py [--quick] [--rounds 3] [--steps 150] [--servers 1] [--json out.json]
    python benchmarks/codec_overhead.py --configs none topk-ef --profile /tmp/prof   # cProfile of worker 0
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from benchmarks.training import LR, MULTI_THREADS, PER_WORKER, make_batches, make_model, set_threads  # noqa: E402

WORKERS = 2
# name -> zps run options; "none" is the baseline every ratio is taken against
CONFIGS: dict[str, list[str]] = {
    "none": [],
    "topk-ef": ["--codec", "topk:ratio=0.01", "--error-feedback"],
    "topk-ef+pull": ["--codec", "topk:ratio=0.01", "--error-feedback", "--pull-codec", "topk:ratio=0.01"],
    "powersgd-ef": ["--codec", "powersgd:rank=2", "--error-feedback"],
}


def worker_main(warmup: int, steps: int, profile: str | None) -> None:
    """One worker of a configuration: ``warmup`` untimed steps, then ``steps`` timed ones (rank 0 reports)."""
    import torch
    import torch.nn.functional as F

    from zps import worker

    set_threads(MULTI_THREADS)
    client = worker.init()
    model = make_model("cnn")
    opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, overlap=False)
    batches = make_batches("cnn", PER_WORKER["cnn"], seed=1 + client.rank)
    times: list[float] = []
    computes: list[float] = []  # forward + backward of each timed step (the rest of a step is zps's)
    cpus: list[float] = []  # CPU seconds (this process, all threads) of each timed step's zps part
    prof = cProfile.Profile() if profile and client.rank == 0 else None
    for i in range(warmup + steps):
        if i == warmup:
            client.rendezvous.barrier("codec-overhead-start")
            if prof is not None:
                prof.enable()
        started = time.perf_counter()
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        computed, cpu = time.perf_counter(), time.process_time()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
            computes.append(computed - started)
            cpus.append(time.process_time() - cpu)
    if prof is not None and profile:
        prof.disable()
        stats = pstats.Stats(prof)
        stats.dump_stats(profile + ".prof")
        with open(profile + ".txt", "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(60)
    if client.rank == 0:
        C.emit_result({"times": times, "computes": computes, "cpus": cpus, "loss": loss.item()})
    worker.shutdown()


def run_config(name: str, servers: int, warmup: int, steps: int, profile: str | None) -> dict[str, Any]:
    args = ["--role-worker", "--warmup", str(warmup), "--steps", str(steps)]
    if profile:
        args += ["--profile", f"{profile}-{name}"]
    env = {"OMP_NUM_THREADS": str(MULTI_THREADS)}
    return C.run_zps(__file__, args, servers=servers, workers=WORKERS, mode="bsp", env=env, timeout=300,
                     zps_args=CONFIGS[name])


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=None, help="times each configuration is started, in turn")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--servers", type=int, default=1)
    parser.add_argument("--profile", default=None, help="cProfile worker 0 of each run into PREFIX-NAME.{prof,txt}")
    parser.add_argument("--role-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.quick else 150)
    if args.role_worker:
        worker_main(args.warmup, steps, args.profile)
        return {}
    rounds = args.rounds or (2 if args.quick else 3)
    names = ["none", *(n for n in args.configs if n != "none")]
    started, load_before = time.monotonic(), C.load_avg()
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}  # per run: medians of step, compute, zps
    loads: dict[str, list[str]] = {n: [] for n in names}
    losses: dict[str, float] = {}
    for round_ in range(rounds):
        for name in names:
            load = C.load_avg()
            result = run_config(name, args.servers, args.warmup, steps, args.profile)
            times, computes = result["times"], result["computes"]
            run = {"step": statistics.median(times), "compute": statistics.median(computes),
                   "zps": statistics.median(t - c for t, c in zip(times, computes, strict=True)),
                   "zps_cpu": statistics.mean(result["cpus"])}
            runs[name].append(run)
            loads[name].append(load.split()[0])
            losses[name] = result["loss"]
            print(f"round {round_ + 1}/{rounds} {name}: median step {run['step'] * 1e3:.2f} ms, compute "
                  f"{run['compute'] * 1e3:.2f} ms, zps {run['zps'] * 1e3:.2f} ms (CPU {run['zps_cpu'] * 1e3:.2f} ms) "
                  f"(load {load})", flush=True)

    def med(name: str, part: str) -> float:
        return statistics.median(r[part] for r in runs[name])

    rows = []
    for name in names:
        per_run = " ".join(f"{r['step'] * 1e3:.1f}" for r in runs[name])
        rows.append([name, " ".join(CONFIGS[name]) or "(defaults)", C.fmt(med(name, "step") * 1e3), per_run,
                     C.ratio(med(name, "step"), med("none", "step")),
                     C.fmt(med(name, "compute") * 1e3), C.fmt(med(name, "zps") * 1e3),
                     f"{(med(name, 'zps') - med('none', 'zps')) * 1e3:+.2f}", C.fmt(med(name, "zps_cpu") * 1e3),
                     f"{losses[name]:.3f}",
                     ", ".join(loads[name])])
    params = sum(p.numel() for p in make_model("cnn").parameters())
    markdown = "\n".join([
        f"### codec overhead: CNN ({params / 1e6:.2f}M parameters), {WORKERS} workers x {args.servers} server(s), "
        "BSP, unshaped loopback",
        "",
        f"{rounds} round(s), configurations in turn; each run {args.warmup} warm-up steps then {steps} timed steps "
        f"(worker 0); per run the median step, the median of its compute (forward + backward) and of the rest "
        "(zps: `opt.step()`, encode, wait, decode), and the worker process's mean CPU time in that part (all its "
        "threads: less sensitive to the machine's load than wall time); the table's figures are medians over the "
        f"runs. Batch "
        f"{PER_WORKER['cnn']} per worker.",
        "",
        C.md_table(["config", "zps run options", "step (ms)", "per run (ms)", "vs none", "compute (ms)", "zps (ms)",
                    "zps - none's (ms)", "zps CPU (ms)", "last loss", "1-min load at starts"], rows),
    ])
    data = {"rounds": rounds, "steps": steps, "servers": args.servers, "runs": runs,
            "ratios": {n: med(n, "step") / med("none", "step") for n in names}}
    return C.finish("codec_overhead", markdown, data, args.json, started, load_before)


if __name__ == "__main__":
    main()
