"""What observability costs: training throughput with Prometheus metrics and step traces on, beside off.

    .venv/bin/python benchmarks/observability.py [--quick] [--reps 3] [--json out.json]

The same ``zps run`` job, BSP, 2 servers x 2 workers, ``worker.DistributedOptimizer`` (SGD), run plain and with
``--metrics-port P --trace DIR`` in turn, ``--reps`` times (the order flips every repetition); while the
observed job runs, this process scrapes every metrics endpoint (the coordinator's and each server's) every second,
as Prometheus would. Two models of benchmarks/training.py: the CNN (151k parameters in 8 tensors: steps of a few
milliseconds, where per-step costs weigh most) and the 4.77M-parameter MLP. Steps/s: a fixed number of steps after
warm-up steps, timed in windows by worker 0, median window. Reported: medians over the repetitions, observed /
plain, and the 1-minute load average at the starts of the runs. The target: >= 0.95x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from tests.helpers import free_ports  # noqa: E402

LR = 0.01
SERVERS = 2


def train_worker(model_kind: str, warmup: int, windows: int, steps: int) -> None:
    import torch

    from benchmarks.training import PER_WORKER, local_step, make_batches, make_model, set_threads, timed_windows
    from zps import worker

    set_threads(1)
    client = worker.init()
    model = make_model(model_kind)
    opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model)
    step = local_step(model, opt, make_batches(model_kind, PER_WORKER[model_kind], seed=1 + client.rank))
    client.barrier("bench-start")
    times = timed_windows(step, warmup=warmup, windows=windows, steps=steps)
    if client.rank == 0:
        job = client.config.job
        C.emit_result({"rates": [steps / t for t in times], "observed": bool(job.metrics_port and job.trace)})
    worker.shutdown()


class Scraper:
    """Scrapes ``ports`` every second until stopped (what a Prometheus server does to a job)."""

    def __init__(self, ports: list[int]) -> None:
        self.ports, self.scrapes = ports, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for port in self.ports:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                        r.read()
                    self.scrapes += 1
                except OSError:
                    pass  # not serving yet, or already gone

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.scrapes


def measure(model_kind: str, observed: bool, sched: dict[str, int]) -> tuple[float, int]:
    args = ["--role-train", "--model", model_kind, "--warmup", str(sched["warmup"]), "--windows",
            str(sched["windows"]), "--steps", str(sched["steps"])]
    scraper = None
    with tempfile.TemporaryDirectory(prefix="zps-trace-") as trace:
        zps_args = ["--progress", "off"]
        if observed:
            base = free_ports(1 + SERVERS)
            zps_args += ["--metrics-port", str(base), "--trace", trace]
            scraper = Scraper(list(range(base, base + 1 + SERVERS)))
        try:
            result = C.run_zps(__file__, args, servers=SERVERS, workers=2, mode="bsp", zps_args=zps_args, timeout=600)
        finally:
            scrapes = scraper.stop() if scraper is not None else 0
        if bool(result.get("observed")) != observed:
            raise RuntimeError(f"the job ran observed={result.get('observed')}, asked {observed}")
        if observed and not (Path(trace) / "trace.json").exists():
            raise RuntimeError("the observed job wrote no trace")
    return C.median(result["rates"]), scrapes


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__)
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each plain/observed pair (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed window (default 50)")
    parser.add_argument("--windows", type=int, default=None, help="timed training windows per run (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 10)")
    parser.add_argument("--role-train", action="store_true", help=argparse.SUPPRESS)  # inside zps run
    parser.add_argument("--model", default="cnn", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    sched = {"warmup": args.warmup or (5 if args.quick else 10), "windows": args.windows or (3 if args.quick else 5),
             "steps": args.steps or (20 if args.quick else 50)}
    if args.role_train:
        train_worker(args.model, **sched)
        return 0
    started, load_before = time.monotonic(), C.load_avg()
    models = {"cnn": "CNN, 151k params in 8 tensors", "mlp": "MLP, 4.77M params in 6 tensors"}
    values = {m: {"plain": [], "observed": []} for m in models}  # type: dict[str, dict[str, list[float]]]
    loads: dict[str, list[float]] = {m: [] for m in models}
    scrapes = 0
    for rep in range(reps):
        order = [False, True] if rep % 2 == 0 else [True, False]
        for model_kind in models:
            for observed in order:
                variant = "observed" if observed else "plain"
                load = C.load_avg()
                loads[model_kind].append(float(load.split()[0]) if load != "?" else float("nan"))
                print(f"rep {rep + 1}/{reps}: {model_kind}, {variant} (load {load}) ...", flush=True)
                rate, n = measure(model_kind, observed, sched)
                scrapes += n
                values[model_kind][variant].append(rate)
                print(f"    {rate:,.1f} steps/s", flush=True)
    rows: list[list[str]] = []
    summary: dict[str, dict[str, float]] = {}
    for model_kind, label in models.items():
        plain, watched = C.median(values[model_kind]["plain"]), C.median(values[model_kind]["observed"])
        summary[model_kind] = {"plain": plain, "observed": watched, "ratio": watched / plain}
        rows.append([f"zps training, {label}, 2 servers x 2 workers, BSP", C.fmt(plain, 1), C.fmt(watched, 1),
                     C.ratio(watched, plain), f"{min(loads[model_kind]):.2f}-{max(loads[model_kind]):.2f}"])
    md = "\n".join([
        f"### observability: what metrics and traces cost, medians of {reps} run(s) each, alternating",
        "",
        C.md_table(["job", "plain steps/s", "metrics + trace steps/s", "observed / plain", "1-min load at starts"],
                   rows, align="lrrrr"),
        "",
        f"- observed: --metrics-port (the coordinator and both servers scraped every second: {scrapes} scrapes in "
        "all) and --trace (every step's spans, merged at the end)",
        f"- {sched['warmup']} warm-up steps, then {sched['windows']} windows of {sched['steps']} steps, median window "
        "(worker 0's clock), SGD lr 0.01, 64 samples per worker, 1 torch thread per worker",
        "- the order of plain and observed flips every repetition; target >= 0.95x",
    ])
    C.finish("observability", md, {"reps": reps, "schedule": sched, "values": values, "loads": loads,
                                   "summary": summary}, args.json, started, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
