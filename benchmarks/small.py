"""Round trips per second for 4 KiB tensors: zps push_pull beside raw pyzmq REQ/REP, same run, loopback.

- one tensor per round trip (latency-bound): a REQ socket sends 4 KiB, a REP peer in another process echoes it;
  zps: 1 worker + 1 server, BSP, ``push_pull`` of one 1024-element float32 tensor (4 KiB each way), SGD lr=0.
- many small tensors per round trip (a model's biases and norms; zps packs them into one message per server):
  REQ/REP of one multipart message with a header frame and ``--keys`` frames of 4 KiB, echoed; zps ``push_pull``
  of ``--keys`` such tensors. Rates are tensors per second.

Rates are calls per second in back-to-back windows of about ``--window`` seconds; the median window is reported.

    python benchmarks/small.py [--quick] [--windows 5] [--window 1.0] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402

NBYTES = 4096


def rep_server() -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    print(sock.bind_to_random_port("tcp://127.0.0.1"), flush=True)
    while True:
        msg = sock.recv_multipart(copy=False)
        if len(msg) == 1 and len(msg[0]) == 0:
            sock.send(b"")
            break
        sock.send_multipart(msg, copy=False)
    sock.close()
    ctx.term()


def bench_reqrep(windows: int, window: float, keys: int) -> dict[str, list[float]]:
    """Round trips/s of one 4 KiB frame, and tensors/s of a header + ``keys`` frames of 4 KiB per round trip."""
    import zmq

    payload = b"\x01" * NBYTES
    many = [b"\x02" * 64] + [payload] * keys
    with C.zmq_peer([sys.executable, __file__, "--role-rep"], zmq.REQ) as sock:

        def round_trip() -> None:
            sock.send(payload)
            sock.recv()

        def round_trip_many() -> None:
            sock.send_multipart(many)
            sock.recv_multipart()

        rates = {
            "one": C.rate_windows(round_trip, windows, window, warmup=0.5),
            "many": [r * keys for r in C.rate_windows(round_trip_many, windows, window, warmup=0.5)],
        }
        sock.send(b"")
        sock.recv()
    return rates


def zps_worker(windows: int, window: float, keys: int) -> None:
    import torch

    from zps import worker

    torch.set_num_threads(1)
    client = worker.init()
    values = {name: torch.zeros(NBYTES // 4) for name in ["w", *(f"k{i}" for i in range(keys))]}
    client.declare(values, ("SGD", [{"lr": 0.0}]) if client.rank == 0 else None)
    one = {"w": values["w"]}
    many = {name: t for name, t in values.items() if name != "w"}
    grads = {name: torch.full_like(t, 0.5) for name, t in values.items()}
    steps = {"w": 0, "many": 0}

    def round_trip() -> None:
        client.push_pull({"w": grads["w"]}, one, steps["w"]).result()
        steps["w"] += 1

    def round_trip_many() -> None:
        client.push_pull({name: grads[name] for name in many}, many, steps["many"]).result()
        steps["many"] += 1

    rates = {
        "one": C.rate_windows(round_trip, windows, window, warmup=0.5),
        "many": [r * keys for r in C.rate_windows(round_trip_many, windows, window, warmup=0.5)],
    }
    if client.rank == 0:
        C.emit_result({"rates": rates})
    worker.shutdown()


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument("--windows", type=int, default=None, help="timed windows (median reported)")
    parser.add_argument("--window", type=float, default=None, help="seconds per window")
    parser.add_argument("--keys", type=int, default=64, help="4 KiB tensors per round trip in the many-tensor case")
    parser.add_argument("--role-rep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--role-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    windows = args.windows or (3 if args.quick else 7)
    window = args.window or (0.5 if args.quick else 1.0)
    if args.role_rep:
        rep_server()
        return {}
    if args.role_worker:
        zps_worker(windows, window, args.keys)
        return {}

    started, load_before = time.monotonic(), C.load_avg()
    loads = {"pyzmq": C.load_avg()}
    print(f"measuring pyzmq REQ/REP (load {loads['pyzmq']}) ...", flush=True)
    reqrep = bench_reqrep(windows, window, args.keys)
    shm_env, no_shm_env, shm_note = C.shm_option()
    worker_args = ["--role-worker", "--windows", str(windows), "--window", str(window), "--keys", str(args.keys)]
    loads["zps"] = C.load_avg()
    print(f"measuring zps push_pull (load {loads['zps']}) ...", flush=True)
    zps = C.run_zps(__file__, worker_args, env=no_shm_env, timeout=300)["rates"]
    zps_shm = None
    if shm_env is not None:
        loads["zps-shm"] = C.load_avg()
        print(f"measuring zps push_pull through shared memory (load {loads['zps-shm']}) ...", flush=True)
        zps_shm = C.run_zps(__file__, worker_args, env=shm_env, timeout=300)["rates"]
    r, z = C.median(reqrep["one"]), C.median(zps["one"])
    rows = [
        ["pyzmq REQ/REP", C.fmt(r, 0), C.fmt(1e6 / r, 1), "1.00x"],
        ["zps push_pull (BSP, 1 worker, 1 server)", C.fmt(z, 0), C.fmt(1e6 / z, 1), C.ratio(z, r)],
    ]
    rm, zm = C.median(reqrep["many"]), C.median(zps["many"])
    rows_many = [
        [f"pyzmq REQ/REP, header + {args.keys} frames", C.fmt(rm, 0), C.fmt(1e6 * args.keys / rm, 1), "1.00x"],
        [f"zps push_pull of {args.keys} tensors", C.fmt(zm, 0), C.fmt(1e6 * args.keys / zm, 1), C.ratio(zm, rm)],
    ]
    if zps_shm:
        zs, zsm = C.median(zps_shm["one"]), C.median(zps_shm["many"])
        rows.append(["zps push_pull, shared memory", C.fmt(zs, 0), C.fmt(1e6 / zs, 1), C.ratio(zs, r)])
        rows_many.append(
            [
                f"zps push_pull of {args.keys} tensors, shared memory",
                C.fmt(zsm, 0),
                C.fmt(1e6 * args.keys / zsm, 1),
                C.ratio(zsm, rm),
            ]
        )
    verdict = (
        f"target zps >= 0.70x pyzmq REQ/REP: one tensor per round trip {'met' if z / r >= 0.7 else 'MISSED'} "
        f"({z / r:.2f}x); "
        f"{args.keys} per round trip {'met' if zm / rm >= 0.7 else 'MISSED'} ({zm / rm:.2f}x)"
    )
    md = "\n".join(
        [
            "### small: 4 KiB round trips per second, loopback",
            "",
            f"Median of {windows} windows of {window:g} s each (after 0.5 s of warm-up).",
            "",
            C.md_table(["one tensor per round trip", "round trips/s", "us / round trip", "vs pyzmq"], rows),
            "",
            C.md_table([f"{args.keys} tensors per round trip", "tensors/s", "us / round trip", "vs pyzmq"], rows_many),
            "",
            f"- {verdict}",
            f"- {shm_note}; the plain zps rows run with it off (ZeroMQ over loopback TCP)"
            if shm_env
            else f"- {shm_note}",
            "- load average at the start of each contender: " + "; ".join(f"{k} {v}" for k, v in loads.items()),
        ]
    )
    return C.finish(
        "small",
        md,
        {
            "pyzmq_rates": reqrep,
            "zps_rates": zps,
            "zps_shm_rates": zps_shm,
            "zps_over_pyzmq": z / r,
            "zps_over_pyzmq_many": zm / rm,
            "keys": args.keys,
            "loads": loads,
        },
        args.json,
        started,
        load_before,
    )


if __name__ == "__main__":
    main()
