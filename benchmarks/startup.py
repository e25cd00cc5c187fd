"""Start-up and teardown of a local job, beside the cost of importing torch measured in the same run.

    .venv/bin/python benchmarks/startup.py            # 5 runs of each, with and without the zygote
    .venv/bin/python benchmarks/startup.py --runs 3 --preload off

For a 2-server x 2-worker ``zps run`` of examples/digits.py (one epoch, a fraction of a second of training), from
the launcher's own output, each line time-stamped as it arrives:

* serve: seconds from starting ``zps run`` until every server logged "serving" (a server imports torch, binds,
  registers) -- beside the baseline, ``python -c "import torch"`` alone;
* exit lag: seconds from the last worker process's exit until ``zps run`` exited (the launcher logs each child's
  exit at DEBUG);
* total: the whole job, wall clock.

Each with ``--preload`` (the default: the processes are forked by a zygote that imported torch once) and with
``--no-preload`` (each process a fresh interpreter).

Medians of the runs, with the load average beside them: absolute figures on a shared machine drift.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVING = re.compile(r"\[server (\d+)\] .*serving at")
WORKER_EXIT = re.compile(r"worker (\d+) exited with code")


def import_torch() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.monotonic() - started


def one_job(servers: int, workers: int, preload: bool = True) -> dict[str, float]:
    """One job; the times (seconds from its start) of what its output says."""
    cmd = [
        sys.executable,
        "-m",
        "zps.launcher.cli",
        "run",
        "--servers",
        str(servers),
        "--workers",
        str(workers),
        "--log-level",
        "DEBUG",
        "--preload" if preload else "--no-preload",
        "examples/digits.py",
        "--epochs",
        "1",
    ]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    served: dict[int, float] = {}
    exited: dict[int, float] = {}
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - started
            lines.append(line)
            if (m := SERVING.search(line)) is not None:
                served[int(m.group(1))] = now
            if (m := WORKER_EXIT.search(line)) is not None:
                exited[int(m.group(1))] = now

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    ended = time.monotonic() - started
    reader.join(10)
    if code != 0 or len(served) != servers or len(exited) != workers:
        raise RuntimeError(f"the job failed (exit {code}):\n{''.join(lines)}")
    return {"serve": max(served.values()), "exit_lag": ended - max(exited.values()), "total": ended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--preload", choices=["both", "on", "off"], default="both",
                        help="measure jobs with the zygote (on), without it (off), or both, alternating")
    args = parser.parse_args()
    variants = {"both": [True, False], "on": [True], "off": [False]}[args.preload]
    baseline = [import_torch() for _ in range(args.runs)]
    jobs: dict[bool, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.runs):  # alternating, so a change in the machine's load touches both alike
        for preload in variants:
            jobs[preload].append(one_job(2, 2, preload))
    load = os.getloadavg()[0]
    torch_s = statistics.median(baseline)
    print(f"# startup: 2 servers x 2 workers, digits 1 epoch; medians of {args.runs} runs; load average {load:.2f}")
    print(f"python -c 'import torch'            {torch_s:6.2f} s")
    for preload, runs in jobs.items():
        serve = statistics.median(j["serve"] for j in runs)
        lag = statistics.median(j["exit_lag"] for j in runs)
        total = statistics.median(j["total"] for j in runs)
        print(f"## {'--preload (zygote)' if preload else '--no-preload'}")
        print(f"every server serving                {serve:6.2f} s   {serve / torch_s:.2f}x import torch  "
              "(target <= 1.5x)")
        print(f"exit lag after the last worker      {lag:6.2f} s   (target <= 0.5 s)")
        print(f"whole job                           {total:6.2f} s")
        print("runs:", ", ".join(f"serve {j['serve']:.2f} lag {j['exit_lag']:.2f} total {j['total']:.2f}"
                                 for j in runs))


if __name__ == "__main__":
    main()
