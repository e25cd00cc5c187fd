"""Round trips per second for a 4 KiB tensor: zps push_pull beside raw pyzmq REQ/REP of 4 KiB, same run, loopback.

- pyzmq: a REQ socket sends 4 KiB, a REP peer in another process replies with the same 4 KiB.
- zps: 1 worker + 1 server, BSP, ``push_pull`` of one 1024-element float32 tensor (4 KiB each way), SGD lr=0.

Rates are calls per second in back-to-back windows of about ``--window`` seconds; the median window is reported.

    python benchmarks/small.py [--quick] [--windows 5] [--window 1.0] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NBYTES = 4096


def rep_server() -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    while True:
        msg = sock.recv(copy=False)
        if len(msg) == 0:
            sock.send(b"")
            break
        sock.send(msg, copy=False)
    sock.close()
    ctx.term()


def bench_reqrep(windows: int, window: float) -> list[float]:
    import zmq

    ctx = zmq.Context()
    try:
        with C.Helper([sys.executable, __file__, "--role-rep"]) as helper:
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{int(helper.ready_line)}")
            payload = b"\x01" * NBYTES
            try:
                def round_trip() -> None:
                    sock.send(payload)
                    sock.recv()

                rates = C.rate_windows(round_trip, windows, window, warmup=0.5)
                sock.send(b"")
                sock.recv()
            finally:
                sock.close()
    finally:
        ctx.term()
    return rates


def zps_worker(windows: int, window: float) -> None:
    import torch

    import worker

    torch.set_num_threads(1)
    client = worker.init()
    value = torch.zeros(NBYTES // 4)
    grad = torch.full_like(value, 0.5)
    client.declare({"w": value}, ("SGD", [{"lr": 0.0}]) if client.rank == 0 else None)
    step = 0

    def round_trip() -> None:
        nonlocal step
        client.push_pull({"w": grad}, {"w": value}, step).result()
        step += 1

    rates = C.rate_windows(round_trip, windows, window, warmup=0.5)
    if client.rank == 0:
        C.emit_result({"rates": rates})
    worker.shutdown()


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument("--windows", type=int, default=None, help="timed windows (median reported)")
    parser.add_argument("--window", type=float, default=None, help="seconds per window")
    parser.add_argument("--role-rep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    windows = args.windows or (3 if args.quick else 7)
    window = args.window or (0.5 if args.quick else 1.0)
    if args.role_rep:
        rep_server()
        return {}
    if args.role_worker:
        zps_worker(windows, window)
        return {}

    started, load_before = time.monotonic(), C.load_avg()
    loads = {"pyzmq": C.load_avg()}
    print(f"measuring pyzmq REQ/REP (load {loads['pyzmq']}) ...", flush=True)
    reqrep = bench_reqrep(windows, window)
    shm_env, no_shm_env, shm_note = C.shm_option()
    worker_args = ["--role-worker", "--windows", str(windows), "--window", str(window)]
    loads["zps"] = C.load_avg()
    print(f"measuring zps push_pull (load {loads['zps']}) ...", flush=True)
    zps = C.run_zps(__file__, worker_args, env=no_shm_env, timeout=300)["rates"]
    zps_shm = None
    if shm_env is not None:
        loads["zps-shm"] = C.load_avg()
        print(f"measuring zps push_pull through shared memory (load {loads['zps-shm']}) ...", flush=True)
        zps_shm = C.run_zps(__file__, worker_args, env=shm_env, timeout=300)["rates"]
    r, z = C.median(reqrep), C.median(zps)
    rows = [
        ["pyzmq REQ/REP", C.fmt(r, 0), C.fmt(1e6 / r, 1), "1.00x"],
        ["zps push_pull (BSP, 1 worker, 1 server)", C.fmt(z, 0), C.fmt(1e6 / z, 1), C.ratio(z, r)],
    ]
    if zps_shm:
        zs = C.median(zps_shm)
        rows.append(["zps push_pull, shared memory", C.fmt(zs, 0), C.fmt(1e6 / zs, 1), C.ratio(zs, r)])
    verdict = f"target zps >= 0.70x pyzmq REQ/REP: {'met' if z / r >= 0.7 else 'MISSED'} ({z / r:.2f}x)"
    md = "\n".join([
        "### small: 4 KiB round trips per second, loopback",
        "",
        f"Median of {windows} windows of {window:g} s each (after 0.5 s of warm-up).",
        "",
        C.md_table(["contender", "round trips/s", "us / round trip", "vs pyzmq"], rows),
        "",
        f"- {verdict}",
        f"- {shm_note}; the plain zps row runs with it off (ZeroMQ over loopback TCP)" if shm_env else f"- {shm_note}",
        "- load average at the start of each contender: " + "; ".join(f"{k} {v}" for k, v in loads.items()),
    ])
    return C.finish("small", md, {"pyzmq_rates": reqrep, "zps_rates": zps, "zps_shm_rates": zps_shm, "zps_over_pyzmq": z / r, "loads": loads},
                    args.json, started, load_before)


if __name__ == "__main__":
    main()
