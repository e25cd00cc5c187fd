"""What --secure (CurveZMQ on every socket) costs zps: the same jobs plain and secure, beside pyzmq with and without.

The same zps jobs with and without ``--secure``, in the same run, beside pyzmq alone moving the same bytes plain and
with CURVE.

    .venv/bin/python benchmarks/secure.py [--quick] [--reps 3] [--json out.json]

Measures, each run plain and secure in turn, ``--reps`` times (the order flips every repetition):

* training: steps/s of a ``zps run`` job, BSP, 2 servers x 2 workers, the 4.77M-parameter MLP of
  benchmarks/training.py with ``worker.DistributedOptimizer`` (SGD); a fixed number of steps after warm-up steps,
  timed in windows by worker 0, median window. Twice: with zps's defaults (tensor bytes through same-host shared
  memory, so CURVE sees only the headers) and with ``--no-shm`` (every byte over loopback TCP, as across hosts).
* zps goodput: 16 MiB ``push_pull`` round trips, 1 worker x 1 server, ``--no-shm``, SGD lr 0;
  goodput = (bytes sent + bytes received) / median round trip, in MB/s (10**6 bytes).
* pyzmq: one 16 MiB frame echoed by a ROUTER in a helper process to a DEALER over loopback TCP, plain and with
  CURVE (``curve_server``/``curve_secretkey`` on the echo side, ``curve_serverkey``/``curve_publickey``/
  ``curve_secretkey`` on the client, keys from ``zmq.curve_keypair()``): the ceiling of what CURVE allows.

Reported: medians over the repetitions, secure / plain, and the 1-minute load average at the starts of the runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402

MIB = 1 << 20
GOODPUT_MIB = 16
LR = 0.01
# the echo helper's CURVE keys travel in its environment, never on a command line
ENV_CURVE_SECRET = "ZPS_BENCH_CURVE_SECRET"
ENV_CURVE_PUBLIC = "ZPS_BENCH_CURVE_PUBLIC"


# -- inside zps run ------------------------------------------------------------------------------------------
def train_worker(warmup: int, windows: int, steps: int) -> None:
    import torch

    from benchmarks.training import PER_WORKER, local_step, make_batches, make_model, set_threads, timed_windows
    from zps import worker

    set_threads(1)
    client = worker.init()
    model = make_model("mlp")
    opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model)
    step = local_step(model, opt, make_batches("mlp", PER_WORKER["mlp"], seed=1 + client.rank))
    client.barrier("bench-start")
    times = timed_windows(step, warmup=warmup, windows=windows, steps=steps)
    if client.rank == 0:
        C.emit_result({"rates": [steps / t for t in times], "secure": client.config.secrets is not None})
    worker.shutdown()


def goodput_worker(repeats: int) -> None:
    import torch

    from zps import worker

    torch.set_num_threads(1)
    client = worker.init()
    name = f"t{GOODPUT_MIB}"
    values = {name: torch.zeros(GOODPUT_MIB * MIB // 4)}
    client.declare(values, ("SGD", [{"lr": 0.0}]) if client.rank == 0 else None)
    grad = {name: torch.full_like(values[name], 0.5)}
    step = 0

    def round_trip() -> None:
        nonlocal step
        client.push_pull(grad, values, step).result()
        step += 1

    times = C.time_calls(round_trip, repeats, warmup=2)
    if client.rank == 0:
        C.emit_result({"times": times, "secure": client.config.secrets is not None})
    worker.shutdown()


# -- the pyzmq echo peer (a helper process) --------------------------------------------------------------------
def zmq_echo_server() -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    secret = os.environ.get(ENV_CURVE_SECRET)
    if secret:
        sock.curve_server = True
        sock.curve_secretkey = secret.encode()
        sock.curve_publickey = os.environ[ENV_CURVE_PUBLIC].encode()
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    C.echo_until_empty(sock)


def bench_pyzmq(secure: bool, repeats: int) -> list[float]:
    """Round-trip times of one 16 MiB frame through the echo peer."""
    import zmq

    env: dict[str, str] = {}
    if secure:
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        env = {ENV_CURVE_SECRET: server_secret.decode(), ENV_CURVE_PUBLIC: server_public.decode()}
    ctx = zmq.Context()
    try:
        with C.Helper([sys.executable, __file__, "--role-zmq-echo"], env=env) as helper:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, 120_000)  # a peer that never answers fails the run instead of hanging it
            sock.setsockopt(zmq.SNDTIMEO, 120_000)
            try:
                if secure:
                    sock.curve_serverkey = server_public
                    sock.curve_publickey = client_public
                    sock.curve_secretkey = client_secret
                sock.connect(f"tcp://127.0.0.1:{int(helper.ready_line)}")
                mechanism = sock.getsockopt(zmq.MECHANISM)
                if mechanism != (zmq.CURVE if secure else zmq.NULL):
                    raise RuntimeError(f"the pyzmq client socket speaks mechanism {mechanism!r}, not the one asked for")
                payload = memoryview(bytearray(b"\x01" * (GOODPUT_MIB * MIB)))

                def round_trip() -> None:
                    sock.send(payload, copy=False)
                    reply = sock.recv(copy=False)
                    if len(reply) != len(payload):
                        raise RuntimeError(f"the echo peer answered {len(reply)} bytes, not {len(payload)}")

                times = C.time_calls(round_trip, repeats, warmup=2)
                sock.send(b"")  # the peer's signal to end; Helper.close ends it anyway
            finally:
                sock.close()
    finally:
        ctx.term()
    return times


# -- the measures ---------------------------------------------------------------------------------------------
def mbps(times: list[float]) -> float:
    """Goodput in MB/s of the median round trip (16 MiB each way)."""
    return 2 * GOODPUT_MIB * MIB / C.median(times) / 1e6


def check_secure(result: dict[str, Any], secure: bool) -> None:
    if bool(result.get("secure")) != secure:
        raise RuntimeError(f"the job ran {'with' if result.get('secure') else 'without'} keys, asked secure={secure}")


def measure_train(secure: bool, shm: bool, sched: dict[str, int]) -> float:
    args = ["--role-train", "--warmup", str(sched["warmup"]), "--windows", str(sched["windows"]),
            "--steps", str(sched["steps"])]
    zps_args = (["--secure"] if secure else []) + ([] if shm else ["--no-shm"])
    result = C.run_zps(__file__, args, servers=2, workers=2, mode="bsp", zps_args=zps_args, timeout=600)
    check_secure(result, secure)
    return C.median(result["rates"])


def measure_goodput(secure: bool, repeats: int) -> float:
    zps_args = (["--secure"] if secure else []) + ["--no-shm"]
    result = C.run_zps(__file__, ["--role-goodput", "--repeats", str(repeats)], servers=1, workers=1, mode="bsp",
                       zps_args=zps_args, timeout=600)
    check_secure(result, secure)
    return mbps(result["times"])


def main(argv: list[str] | None = None) -> int:
    parser = C.base_parser(__doc__)
    parser.add_argument("--reps", type=int, default=None, help="repetitions of each plain/secure pair (default 3)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="16 MiB round trips timed per goodput run (default 30; quick 10)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed window (default 20)")
    parser.add_argument("--windows", type=int, default=None, help="timed training windows per run (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 10)")
    parser.add_argument("--role-train", action="store_true", help=argparse.SUPPRESS)  # inside zps run
    parser.add_argument("--role-goodput", action="store_true", help=argparse.SUPPRESS)  # inside zps run
    parser.add_argument("--role-zmq-echo", action="store_true", help=argparse.SUPPRESS)  # the pyzmq peer
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    repeats = args.repeats or (10 if args.quick else 30)
    sched = {
        "warmup": args.warmup or (5 if args.quick else 10),
        "windows": args.windows or (3 if args.quick else 5),
        "steps": args.steps or (10 if args.quick else 20),
    }
    if args.role_zmq_echo:
        zmq_echo_server()
        return 0
    if args.role_train:
        train_worker(**sched)
        return 0
    if args.role_goodput:
        goodput_worker(repeats)
        return 0
    if min(reps, repeats, *sched.values()) < 1:
        parser.error("--reps, --repeats, --steps, --windows and --warmup must be at least 1")

    import zmq

    if not zmq.has("curve"):
        raise SystemExit("this libzmq has no CURVE support: --secure cannot run here")
    started, load_before = time.monotonic(), C.load_avg()
    measures: dict[str, Callable[[bool], float]] = {
        "train": lambda s: measure_train(s, True, sched),
        "train-noshm": lambda s: measure_train(s, False, sched),
        "zps-goodput": lambda s: measure_goodput(s, repeats),
        "pyzmq-goodput": lambda s: mbps(bench_pyzmq(s, repeats)),
    }
    values: dict[str, dict[str, list[float]]] = {m: {"plain": [], "secure": []} for m in measures}
    loads: dict[str, list[float]] = {m: [] for m in measures}
    for rep in range(reps):
        order = [False, True] if rep % 2 == 0 else [True, False]
        for name, fn in measures.items():
            for secure in order:
                variant = "secure" if secure else "plain"
                load = C.load_avg()
                loads[name].append(float(load.split()[0]) if load != "?" else float("nan"))
                print(f"rep {rep + 1}/{reps}: {name}, {variant} (load {load}) ...", flush=True)
                value = fn(secure)
                values[name][variant].append(value)
                print(f"    {value:,.1f}", flush=True)

    labels = {
        "train": ("zps training, MLP 4.77M params, 2 servers x 2 workers, BSP, defaults (shm)", "steps/s"),
        "train-noshm": ("zps training, same, --no-shm (every byte over TCP)", "steps/s"),
        "zps-goodput": (f"zps push_pull {GOODPUT_MIB} MiB, 1 server x 1 worker, --no-shm", "MB/s"),
        "pyzmq-goodput": (f"pyzmq DEALER/ROUTER echo of one {GOODPUT_MIB} MiB frame (ceiling)", "MB/s"),
    }
    rows = []
    summary: dict[str, dict[str, float]] = {}
    for name, (label, unit) in labels.items():
        plain, curve = C.median(values[name]["plain"]), C.median(values[name]["secure"])
        per_op = (1e3 / plain, 1e3 / curve) if unit == "steps/s" else (
            2 * GOODPUT_MIB * MIB / plain / 1e3, 2 * GOODPUT_MIB * MIB / curve / 1e3)
        summary[name] = {"plain": plain, "secure": curve, "ratio": curve / plain}
        rows.append([
            label,
            unit,
            C.fmt(plain, 1),
            C.fmt(curve, 1),
            C.ratio(curve, plain),
            f"{per_op[0]:.1f} -> {per_op[1]:.1f}",
            f"{min(loads[name]):.2f}-{max(loads[name]):.2f}",
        ])
    headers = ["measure", "unit", "plain", "--secure / CURVE", "secure / plain", "ms per step or round trip",
               "1-min load at starts"]
    md = "\n".join([
        f"### secure: what CurveZMQ costs, medians of {reps} run(s) each, plain and secure alternating",
        "",
        C.md_table(headers, rows, align="llrrrrr"),
        "",
        f"- zps secure / plain: training {summary['train']['ratio']:.2f}x (shm), "
        f"{summary['train-noshm']['ratio']:.2f}x (--no-shm); {GOODPUT_MIB} MiB goodput "
        f"{summary['zps-goodput']['ratio']:.2f}x; pyzmq alone with CURVE: {summary['pyzmq-goodput']['ratio']:.2f}x",
        f"- zps goodput / pyzmq's: {summary['zps-goodput']['plain'] / summary['pyzmq-goodput']['plain']:.2f}x "
        f"plain, {summary['zps-goodput']['secure'] / summary['pyzmq-goodput']['secure']:.2f}x with CURVE",
        f"- training: {sched['warmup']} warm-up steps, then {sched['windows']} windows of {sched['steps']} steps, "
        "median window (worker 0's clock), SGD lr 0.01, 64 samples per worker, 1 torch thread per worker; "
        f"goodput: {repeats} round trips after 2 warm-up ones, median, (sent + received bytes) / time",
        "- with shm (zps's default on one host) the tensor bytes bypass the sockets, so CURVE encrypts only the "
        "headers there; across hosts every byte is encrypted, as in the --no-shm rows",
        "- the order of plain and secure flips every repetition",
    ])
    C.finish(
        "secure",
        md,
        {"reps": reps, "repeats": repeats, "schedule": sched, "values": values, "loads": loads, "summary": summary},
        args.json,
        started,
        load_before,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
