"""Server resident memory against what it must hold: parameters + Adam state, for a 100M-parameter model.

1 server + 1 worker, BSP. The worker declares N float32 parameters (tensors of 4M elements, cut into 4 MiB chunks
by the plan) with Adam on the server, then pushes and pulls every tensor for a few steps. It finds its server in
the process table (``ZPS_ROLE=server`` with its own coordinator address in the environment) and reads the server's
VmRSS and VmHWM from /proc/PID/status after each stage.

The floor is parameters + Adam's two moment buffers = 3 x 4 bytes x N. An idle ``python -c "import torch"`` is
measured in the same run as the interpreter baseline, so the ratio can be read raw and net of it.

    python benchmarks/memory.py [--quick] [--params 100000000] [--steps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402

TENSOR_NUMEL = 4 * 1024 * 1024
MIB = 1 << 20
TARGET = 1.3


def find_servers(coordinator: str) -> list[int]:
    """PIDs of this job's servers: ZPS_ROLE=server and ZPS_COORDINATOR=``coordinator`` in their environment."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if env.get(b"ZPS_ROLE") == b"server" and env.get(b"ZPS_COORDINATOR") == coordinator.encode():
            found.append(int(entry))
    return found


def zps_worker(numel: int, steps: int) -> None:
    import torch

    from zps import worker

    torch.set_num_threads(1)
    client = worker.init()
    sizes = [TENSOR_NUMEL] * (numel // TENSOR_NUMEL) + ([numel % TENSOR_NUMEL] if numel % TENSOR_NUMEL else [])
    values = {f"p{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    pids = find_servers(client.config.coordinator)
    if len(pids) != 1:
        raise RuntimeError(f"expected one server process of coordinator {client.config.coordinator}, found {pids}")
    pid = pids[0]

    def settled() -> dict[str, int]:  # the server frees a message's buffers just after replying: let it finish
        time.sleep(0.5)
        return C.proc_status_kib(pid)

    stages = {"registered": settled()}
    client.declare(values, ("Adam", [{"lr": 1e-3}]))
    stages["after declare"] = settled()
    grads = {name: torch.full_like(v, 1e-3) for name, v in values.items()}
    times = []
    for step in range(steps):
        start = time.perf_counter()
        client.push_pull(grads, values, step).result()
        times.append(time.perf_counter() - start)
        if step == 0:
            stages["after 1 Adam step"] = settled()
    stages[f"after {steps} Adam steps"] = settled()
    C.emit_result({"numel": sum(sizes), "server_pid": pid, "stages": stages, "step_times": times})
    worker.shutdown()


def idle_rss_kib(code: str) -> dict[str, int]:
    with C.Helper(
        [sys.executable, "-c", code + "\nimport sys, time\nprint('ready', flush=True)\ntime.sleep(600)"]
    ) as helper:
        time.sleep(0.3)
        return C.proc_status_kib(helper.pid)


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument(
        "--params", type=int, default=None, help="number of float32 parameters (default 100M; quick 10M)"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the zps job, e.g. MALLOC_MMAP_THRESHOLD_=1048576 (diagnosis)",
    )
    parser.add_argument("--role-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    numel = args.params or (10_000_000 if args.quick else 100_000_000)
    steps = args.steps or (2 if args.quick else 3)
    if args.role_worker:
        zps_worker(numel, steps)
        return {}

    started, load_before = time.monotonic(), C.load_avg()
    torch_idle = idle_rss_kib("import torch")
    server_idle = idle_rss_kib("import torch, zmq, msgpack, numpy\nimport ps.server")
    print(
        f"idle 'import torch': {torch_idle['VmRSS'] / 1024:.0f} MiB; idle server imports: "
        f"{server_idle['VmRSS'] / 1024:.0f} MiB",
        flush=True,
    )
    extra_env = dict(item.split("=", 1) for item in args.env)
    shm_on, shm_off, shm_note = C.shm_option()
    paths = [("zeromq", shm_off)] + ([("shared memory", shm_on)] if shm_on is not None else [])
    base = torch_idle["VmRSS"] * 1024
    runs: dict[str, dict] = {}
    rows, verdicts = [], []
    floor = 0
    for path, path_env in paths:
        load = C.load_avg()
        print(f"measuring the server over {path} (load {load}) ...", flush=True)
        result = C.run_zps(
            __file__,
            ["--role-worker", "--params", str(numel), "--steps", str(steps)],
            servers=1,
            workers=1,
            mode="bsp",
            env={"OMP_NUM_THREADS": "1", **path_env, **extra_env},
            timeout=900,
        )
        result["load"] = load
        runs[path] = result
        floor = 3 * 4 * result["numel"]
        for stage, st in result["stages"].items():
            rss, hwm = st["VmRSS"] * 1024, st["VmHWM"] * 1024
            anon = st.get("RssAnon", 0) * 1024
            rows.append(
                [
                    path,
                    stage,
                    C.fmt(rss / MIB, 0),
                    C.fmt(hwm / MIB, 0),
                    C.fmt(anon / MIB, 0),
                    C.fmt(st.get("RssShmem", 0) / 1024, 0),
                    f"{rss / floor:.2f}x",
                    f"{(rss - base) / floor:.2f}x",
                    f"{hwm / floor:.2f}x",
                    f"{(hwm - base) / floor:.2f}x",
                    f"{anon / floor:.2f}x",
                ]
            )
        last = list(result["stages"].values())[-1]
        raw, net = last["VmRSS"] * 1024 / floor, (last["VmRSS"] * 1024 - base) / floor
        peak_raw, peak_net = last["VmHWM"] * 1024 / floor, (last["VmHWM"] * 1024 - base) / floor
        private = last.get("RssAnon", 0) * 1024 / floor
        result.update(
            steady_ratio_raw=raw,
            steady_ratio_net=net,
            peak_ratio_raw=peak_raw,
            peak_ratio_net=peak_net,
            private_ratio=private,
        )
        verdicts.append(
            f"over {path}: steady RSS {raw:.2f}x raw, {net:.2f}x net "
            f"({'met' if raw <= TARGET else 'met net of the interpreter only' if net <= TARGET else 'MISSED'}); "
            f"peak (VmHWM) {peak_raw:.2f}x raw, {peak_net:.2f}x net "
            f"({'met' if peak_raw <= TARGET else 'met net' if peak_net <= TARGET else 'MISSED'}); "
            f"private (RssAnon, shared pages left out) {private:.2f}x ({'met' if private <= TARGET else 'MISSED'}); "
            "step times " + ", ".join(f"{t:.2f}" for t in result["step_times"]) + f" s; load at start {load}"
        )
    numel_done = next(iter(runs.values()))["numel"]
    md = "\n".join(
        [
            f"### memory: server RSS for {numel_done / 1e6:.0f}M float32 parameters with Adam (1 server, 1 "
            "worker, BSP)",
            "",
            f"Floor = parameters + Adam's exp_avg and exp_avg_sq = 3 x 4 B x {numel_done:,} = {floor / MIB:,.0f} MiB. "
            f"Idle `python -c \"import torch\"`: {torch_idle['VmRSS'] / 1024:.0f} MiB RSS (the 'net' columns "
            "subtract it); "
            "idle process with the server's imports (torch, zmq, msgpack, numpy, ps.server): "
            f"{server_idle['VmRSS'] / 1024:.0f} MiB. "
            "RssShmem is shared-memory pages the server has touched (the worker's segment, mapped by both; "
            "VmRSS counts "
            "them in full), RssAnon the server's private memory. With one worker, BSP applies the received gradient "
            "directly (no accumulator).",
            "",
            C.md_table(
                [
                    "path",
                    "server stage",
                    "VmRSS MiB",
                    "VmHWM MiB",
                    "RssAnon MiB",
                    "RssShmem MiB",
                    "RSS / floor",
                    "net RSS / floor",
                    "HWM / floor",
                    "net HWM / floor",
                    "RssAnon / floor",
                ],
                rows,
                align="ll" + "r" * 9,
            ),
            "",
            f"- target server memory <= {TARGET}x params + optimizer state:",
            *[f"  - {v}" for v in verdicts],
            f"- {shm_note}",
            f"- load average before: {load_before}",
            *([f"- extra environment of the zps jobs: {' '.join(args.env)}"] if args.env else []),
        ]
    )
    return C.finish(
        "memory",
        md,
        {
            "numel": numel_done,
            "floor_bytes": floor,
            "torch_idle_kib": torch_idle,
            "server_imports_idle_kib": server_idle,
            "runs": runs,
        },
        args.json,
        started,
        load_before,
    )


if __name__ == "__main__":
    main()
