"""``zps plan`` against measurement: predicted and measured step times of emulated clusters, side by side.

    .venv/bin/python benchmarks/plan.py [--steps 14] [--json out.json]

Each configuration runs as ``zps run --net SPEC --metrics-out F`` on this host (BSP; the servers' optimizer is the
script's: Adam for examples/lm.py, SGD with momentum for examples/digits.py); measured is the median time between
consecutive steps of the workers after the first 4. Predicted is ``zps plan --local`` for the same model, W, S,
network and codecs, calibrated in this process before the runs. The target (issue 13): within 25% on every
configuration; the median |error| is printed too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from zps.launcher.planner import Setup, calibrate, load_model, predict  # noqa: E402

# (script, script args, workers, servers, net, codec, pull codec, server optimizer)
CONFIGS: list[tuple[str, list[str], int, int, str, str, str, str]] = [
    ("examples/digits.py", [], 2, 1, "bw=10mbit,latency=1ms", "", "", "sgd:lr=0.05,momentum=0.9"),
    ("examples/digits.py", [], 4, 2, "bw=10mbit,latency=2ms", "", "", "sgd:lr=0.05,momentum=0.9"),
    ("examples/lm.py", [], 2, 1, "bw=100mbit,latency=1ms", "", "", "adam:lr=2e-3"),
    ("examples/lm.py", [], 4, 2, "bw=100mbit,latency=1ms", "", "", "adam:lr=2e-3"),
    ("examples/lm.py", [], 4, 2, "bw=100mbit,latency=1ms", "topk:ratio=0.01", "int8", "adam:lr=2e-3"),
    ("examples/lm.py", [], 8, 2, "bw=1gbit,latency=0.5ms", "", "", "adam:lr=2e-3"),
    ("examples/lm.py", [], 2, 2, "bw=1gbit,latency=5ms", "", "", "adam:lr=2e-3"),
]


def measure(script: str, workers: int, servers: int, net: str, codec: str, pull: str, steps: int,
            folder: Path) -> float:
    out = folder / f"{Path(script).stem}-{workers}-{servers}-{abs(hash((net, codec)))}.jsonl"
    argv = [*C.zps_command(), "run", "--servers", str(servers), "--workers", str(workers), "--net", net,
            "--progress", "off", "--metrics-out", str(out)]
    if codec:
        argv += ["--codec", codec, "--error-feedback"]
    if pull:
        argv += ["--pull-codec", pull]
    args = ["--steps", str(steps), "--eval-every", str(10 * steps)] if "lm" in script else ["--epochs", "1"]
    if "digits" in script:
        args += ["--batch-size", "8"]
    done = subprocess.run([*argv, script, *args], cwd=C.ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}")
    by_worker: dict[int, list[float]] = {}
    for line in out.read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "step":
            by_worker.setdefault(r["rank"], []).append(r["t"])
    gaps = [b - a for ts in map(sorted, by_worker.values()) for a, b in list(zip(ts, ts[1:], strict=False))[4:]]
    return statistics.median(gaps)


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--steps", type=int, default=14)
    args = parser.parse_args()
    started, load_before = time.monotonic(), C.load_avg()
    cores = os.cpu_count() or 1
    models = {script: load_model(script, 8) for script in {c[0] for c in CONFIGS}}  # both run batches of 8
    rows, results, errors = [], [], []
    with tempfile.TemporaryDirectory(prefix="zps-plan-") as tmp:
        for script, _, w, s, net, codec, pull, optimizer in CONFIGS:
            costs = calibrate(codec, pull, optimizer)
            predicted = predict(models[script], Setup(w, s, net, codec, pull, "bsp", 1024, cores), costs)
            measured = measure(script, w, s, net, codec, pull, args.steps, Path(tmp))
            error = predicted.step / measured - 1
            errors.append(abs(error))
            results.append({"script": script, "workers": w, "servers": s, "net": net, "codec": codec, "pull": pull,
                            "predicted": predicted.step, "measured": measured, "parts": predicted.parts})
            rows.append([Path(script).stem, str(w), str(s), net, (codec or "none") + (f" / {pull}" if pull else ""),
                         f"{predicted.step * 1e3:.0f}", f"{measured * 1e3:.0f}", f"{error:+.0%}", predicted.bottleneck,
                         C.load_avg().split()[0]])
            print(rows[-1], flush=True)
    table = C.md_table(["model", "W", "S", "--net", "codec / pull", "predicted ms", "measured ms", "error",
                        "predicted bottleneck", "load"], rows)
    table += f"\n\nmedian |error| {statistics.median(errors):.0%}, largest {max(errors):.0%}"
    C.finish("plan", table, {"results": results}, args.json, started, load_before)


if __name__ == "__main__":
    main()
