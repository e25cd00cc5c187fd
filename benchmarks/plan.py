"""``zps plan`` against measurement: predicted and measured step times of emulated clusters, side by side.

    .venv/bin/python benchmarks/plan.py [--only tuned|held-out|all] [--steps 14] [--json out.json]

Each configuration runs as ``zps run --net SPEC --metrics-out F`` on this host (the servers' optimizer is the
script's: Adam for examples/lm.py, SGD with momentum for examples/digits.py); measured is the median time between
consecutive steps of the workers after the first 4. Predicted is ``zps plan --local`` for the same script (its model,
compute and optimizer from its first steps under zps plan's stand-in, with the run's own arguments), W, S, network,
codecs and mode, calibrated in this process just before that run (the host's other load changes).

Two sets: ``tuned``, the eight configurations the model was developed against (issue 13's target: within 25% on
every one), and ``held-out`` (issue 25), configurations chosen after the model was fixed and never used to change it:
other worker and server counts, rates, codecs (QSGD, PowerSGD, fp16) and modes, and examples/ctr.py (issue 23: dense
parameters and an embedding table, small quick settings). The CTR model's table is what a user gives ``zps plan
--table IDS:DIM:ROWS``: the median distinct ids of a worker's batch, read from the script's own data generator, its
16-wide rows and its vocabulary; the servers' row work is measured as ``zps plan`` does (``row_cost``). The median
|error| is printed per set. ``--script ctr`` runs only the configurations of that script.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from zps.lab.planner import Model, Setup, calibrate, key_sizes, model_from, predict  # noqa: E402
from zps.lab.table_plan import row_cost  # noqa: E402

# (set, script, workers, servers, net, codec, pull codec, mode)
CONFIGS: list[tuple[str, str, int, int, str, str, str, str]] = [
    ("tuned", "examples/digits.py", 2, 1, "bw=10mbit,latency=1ms", "", "", "bsp"),
    ("tuned", "examples/digits.py", 4, 2, "bw=10mbit,latency=2ms", "", "", "bsp"),
    ("tuned", "examples/digits.py", 4, 1, "bw=100mbit,latency=20ms", "", "", "asp"),
    ("tuned", "examples/lm.py", 2, 1, "bw=100mbit,latency=1ms", "", "", "bsp"),
    ("tuned", "examples/lm.py", 4, 2, "bw=100mbit,latency=1ms", "", "", "bsp"),
    ("tuned", "examples/lm.py", 4, 2, "bw=100mbit,latency=1ms", "topk:ratio=0.01", "int8", "bsp"),
    ("tuned", "examples/lm.py", 8, 2, "bw=1gbit,latency=0.5ms", "", "", "bsp"),
    ("tuned", "examples/lm.py", 2, 2, "bw=1gbit,latency=5ms", "", "", "bsp"),
    ("held-out", "examples/lm.py", 3, 1, "bw=50mbit,latency=2ms", "", "", "bsp"),
    ("held-out", "examples/lm.py", 4, 3, "bw=200mbit,latency=1ms", "powersgd:rank=4", "", "bsp"),
    ("held-out", "examples/lm.py", 4, 2, "bw=100mbit,latency=1ms", "qsgd", "fp16", "asp"),
    ("held-out", "examples/digits.py", 6, 2, "bw=20mbit,latency=1ms", "fp16", "", "bsp"),
    ("held-out", "examples/digits.py", 3, 3, "bw=5mbit,latency=3ms", "", "", "asp"),
    ("held-out", "examples/ctr.py", 2, 2, "bw=50mbit,latency=1ms", "", "", "bsp"),
    ("held-out", "examples/ctr.py", 3, 1, "bw=200mbit,latency=2ms", "", "", "bsp"),
]
CTR = {"batch_size": 512, "vocab_scale": 0.01}  # small and quick: 339,327 rows, ~4,200 distinct ids per batch


def ctr_tables(workers: int, samples: int = 8) -> tuple[tuple[int, int, int], ...]:
    """examples/ctr.py's table as ``zps plan --table IDS:DIM:ROWS`` takes it: the median distinct ids of a worker's
    batch over ``samples`` steps of its own data generator (with the run's settings), its dim and its rows."""
    spec = importlib.util.spec_from_file_location("zps_ctr_example", C.ROOT / "examples" / "ctr.py")
    assert spec is not None and spec.loader is not None
    ctr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ctr)
    data = ctr.Data(0, CTR["vocab_scale"], 1.1, 0.5)  # the script's defaults: seed 0, --zipf 1.1, --zipf-large 0.5
    distinct = [int(data.batch(CTR["batch_size"], step, rank)["ids"].unique().numel())
                for step in range(samples) for rank in range(workers)]
    return ((int(statistics.median(distinct)), int(ctr.DIM), int(data.rows)),)


def script_args(script: str, steps: int) -> list[str]:
    """The script's arguments in the measured run (the planned model's too, but for its length)."""
    if "lm" in script:
        return ["--steps", str(steps), "--eval-every", str(10 * steps)]
    if "ctr" in script:
        return ["--steps", str(steps), "--batch-size", str(CTR["batch_size"]), "--vocab-scale",
                str(CTR["vocab_scale"]), "--eval-samples", "4096"]
    return ["--epochs", "1", "--batch-size", "8"]


def planned(script: str, workers: int) -> Model:
    """The model ``zps plan --model SCRIPT`` takes (with the run's arguments, for more steps than the probe runs),
    and examples/ctr.py's table."""
    if "lm" in script:
        return model_from(script, script_args(script, 200)[2:])
    if "ctr" in script:
        return replace(model_from(script, script_args(script, 200)), tables=ctr_tables(workers))
    return model_from(script, script_args(script, 0))


def measure(script: str, workers: int, servers: int, net: str, codec: str, pull: str, mode: str, steps: int,
            folder: Path) -> tuple[float, float]:
    """(the median step time, the median compute a worker reported per step) of the run."""
    out = folder / f"{Path(script).stem}-{workers}-{servers}-{abs(hash((net, codec, mode)))}.jsonl"
    argv = [*C.zps_command(), "run", "--servers", str(servers), "--workers", str(workers), "--net", net,
            "--mode", mode, "--progress", "off", "--metrics-out", str(out)]
    if codec:
        argv += ["--codec", codec, "--error-feedback"]
    if pull:
        argv += ["--pull-codec", pull]
    extra = ["--out", str(out.with_suffix(".json"))] if "ctr" in script else []  # (its workers' RSS files beside)
    done = subprocess.run([*argv, script, *script_args(script, steps), *extra], cwd=C.ROOT, capture_output=True,
                          text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}")
    by_worker: dict[int, list[float]] = {}
    compute: list[float] = []
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "step":
            by_worker.setdefault(r["rank"], []).append(r["t"])
            compute.append(r["compute"])
    gaps = [b - a for ts in map(sorted, by_worker.values()) for a, b in list(zip(ts, ts[1:], strict=False))[4:]]
    return statistics.median(gaps), statistics.median(compute)


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--only", choices=("tuned", "held-out", "all"), default="all")
    parser.add_argument("--script", default="", help="only the configurations of this example (lm, digits, ctr)")
    args = parser.parse_args()
    started, load_before = time.monotonic(), C.load_avg()
    cores = os.cpu_count() or 1
    rows, results = [], []
    errors: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="zps-plan-") as tmp:
        for group, script, w, s, net, codec, pull, mode in CONFIGS:
            if args.only not in ("all", group) or (args.script and Path(script).stem != args.script):
                continue
            model = planned(script, w)
            costs = calibrate(codec, pull, model.optimizer, key_sizes(model))
            if model.tables:  # as zps plan --table does
                costs = replace(costs, row=row_cost())
            predicted = predict(model, Setup(w, s, net, codec, pull, mode, 1024, cores), costs)
            measured, compute = measure(script, w, s, net, codec, pull, mode, args.steps, Path(tmp))
            error = predicted.step / measured - 1
            errors.setdefault(group, []).append(abs(error))
            results.append({"set": group, "script": script, "workers": w, "servers": s, "net": net, "codec": codec,
                            "pull": pull, "mode": mode, "predicted": predicted.step, "measured": measured,
                            "parts": predicted.parts, "measured_compute": compute, "tables": model.tables})
            rows.append([group, Path(script).stem, str(w), str(s), net,
                         (codec or "none") + (f" / {pull}" if pull else ""), mode,
                         f"{predicted.step * 1e3:.0f}", f"{measured * 1e3:.0f}", f"{error:+.0%}",
                         f"{predicted.parts['compute'] * 1e3:.0f} / {compute * 1e3:.0f}", predicted.bottleneck,
                         C.load_avg().split()[0]])
            print(rows[-1], flush=True)
    table = C.md_table(["set", "model", "W", "S", "--net", "codec / pull", "mode", "predicted ms", "measured ms",
                        "error", "compute ms pred. / meas.", "predicted bottleneck", "load"], rows)
    for group, got in errors.items():
        table += f"\n\n{group}: median |error| {statistics.median(got):.0%}, largest {max(got):.0%} ({len(got)} runs)"
    C.finish("plan", table, {"results": results}, args.json, started, load_before)


if __name__ == "__main__":
    main()
