"""Training throughput (samples/s) of the same model under several systems, same machine, same run.

Models (synthetic data, fixed batches in memory so no loading is timed):
- mlp: 784 -> 2048 -> 1536 -> 10 (4.77M parameters)
- cnn: conv(1->32, 3x3) pool conv(32->64, 3x3) pool fc(1600->128) fc(128->10) on 1x28x28 (0.23M parameters)
- lm: examples/lm.py's byte-level transformer (8 blocks of width 160; 2.57M parameters in 134 tensors) on random
  64-byte windows

Contenders, all with SGD (lr 0.01) and the same global batch (mlp, cnn: 64 per worker, 128 global; lm: 8 windows per
worker, 16 global, the example's own batch; the single process the global batch):
- single: one process, plain torch.optim
- ddp/gloo: torch DistributedDataParallel, 2 processes, gloo on loopback
- rpc-ps: the PyTorch RPC parameter-server tutorial pattern, 1 PS + 2 trainers: the PS holds the model and runs its
  forward; trainers call it with rpc_sync, run distributed autograd backward and a DistributedOptimizer step
- zps: BSP, 2 workers with 1 and with 2 servers, ``worker.DistributedOptimizer``; with ``overlap=True`` too when
  the optimizer has that option

samples/s = global samples of a window of steps / its wall time (rank 0's clock; for rpc-ps the trainers' rates are
summed per window); the median window is reported.

    python benchmarks/training.py [--quick] [--models mlp cnn lm] [--json out.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402

LR = 0.01
CLIP = 1.0  # the max norm of the "clip" contenders (DDP's meaning: the averaged gradient's global norm)
PER_WORKER = {"mlp": 64, "cnn": 64, "lm": 8}  # samples (lm: 64-byte windows) per worker per step
WORKERS = 2
SINGLE_THREADS = 2  # the single process gets the whole 2-core machine
MULTI_THREADS = 1  # each process of a multi-process contender: one intra-op thread
LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "TP_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


# -- model, data, timed loop ----------------------------------------------------------------------------------------
def lm_example():
    """examples/lm.py as a module (its make_model() and example_batch())."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "lm.py"
    spec = importlib.util.spec_from_file_location("zps_example_lm", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model(kind: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if kind == "lm":
        return lm_example().make_model()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 1536), nn.ReLU(), nn.Linear(1536, 10))
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 5 * 5, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
    raise ValueError(f"unknown model {kind!r}")


def make_batches(kind: str, batch: int, seed: int, count: int = 4) -> list:
    import torch

    if kind == "lm":  # random byte windows of the example's shape (example_batch draws from torch's global RNG)
        torch.manual_seed(seed)
        example = lm_example()
        return [example.example_batch(batch)[:2] for _ in range(count)]
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 784) if kind == "mlp" else (batch, 1, 28, 28)
    return [(torch.randn(*shape, generator=gen), torch.randint(0, 10, (batch,), generator=gen)) for _ in range(count)]


def set_threads(n: int) -> None:
    """Intra-op threads of this process (and one inter-op thread); also quiets torch's deprecation chatter."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*as a ProcessGroup.*")

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set in this process


def timed_windows(step: Callable[[int], None], warmup: int, windows: int, steps: int) -> list[float]:
    """Seconds of each window of ``steps`` steps, after ``warmup`` untimed steps."""
    i = 0
    for _ in range(warmup):
        step(i)
        i += 1
    out = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step(i)
            i += 1
        out.append(time.perf_counter() - start)
    return out


def loss_of(out, y):
    """Cross-entropy of logits ``out`` (..., classes) against targets ``y`` (...): a class per sample or per byte."""
    import torch.nn.functional as F

    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def local_step(model, opt, batches, clip: Callable[[], Any] | None = None) -> Callable[[int], None]:
    """One training step; ``clip``: called between backward and step (gradient clipping)."""
    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        opt.zero_grad()
        loss_of(model(x), y).backward()
        if clip is not None:
            clip()
        opt.step()

    return step


def write(out_dir: str, rank: int, obj: Any) -> None:
    Path(out_dir, f"{rank}.json").write_text(json.dumps(obj))


# -- single process ----------------------------------------------------------------------------------------------
def single_main(kind: str, sched: dict, out_dir: str, threads: int = SINGLE_THREADS) -> None:
    import torch

    set_threads(threads)
    model = make_model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    step = local_step(model, opt, make_batches(kind, PER_WORKER[kind] * WORKERS, seed=1))
    write(out_dir, 0, {"windows": timed_windows(step, **sched), "threads": torch.get_num_threads()})


# -- DDP with gloo ---------------------------------------------------------------------------------------------------
def ddp_main(rank: int, kind: str, sched: dict, out_dir: str, port: int, clip: bool = False) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(LOOPBACK_ENV, MASTER_PORT=str(port))
    set_threads(MULTI_THREADS)
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    try:
        model = DDP(make_model(kind))
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        step = local_step(model, opt, make_batches(kind, PER_WORKER[kind], seed=1 + rank),
                          (lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)) if clip else None)
        dist.barrier()
        windows = timed_windows(step, **sched)
        write(out_dir, rank, {"windows": windows})
        dist.barrier()
    finally:
        dist.destroy_process_group()


# -- the RPC parameter-server pattern (PyTorch tutorial) ---------------------------------------------------------------
class ParameterServer:
    """Holds the model; trainers run its forward remotely and step its parameters via DistributedOptimizer."""

    def __init__(self, kind: str) -> None:
        self.model = make_model(kind)

    def forward(self, x):
        return self.model(x)

    def get_param_rrefs(self) -> list:
        from torch.distributed import rpc

        return [rpc.RRef(p) for p in self.model.parameters()]


_ps: ParameterServer | None = None
_ps_lock = threading.Lock()
_start = threading.Barrier(WORKERS, timeout=300)


def get_parameter_server(kind: str) -> ParameterServer:
    global _ps
    with _ps_lock:
        if _ps is None:
            _ps = ParameterServer(kind)
        return _ps


def call_method(method: str, rref, *args):
    return getattr(rref.local_value(), method)(*args)


# Concurrent trainer steps on one PS model fail ("modified by an inplace operation": one trainer's optimizer step
# lands between another's forward and backward; pytorch/tutorials#2095, pytorch/examples#780). As in the fix the
# example's author proposed (pytorch/examples#842), a trainer holds the PS model from its forward to the end of its
# optimizer step: the forward RPC takes the lock, one more RPC releases it.
_step_lock = threading.Lock()


def locked_forward(rref, x):
    if not _step_lock.acquire(timeout=300):
        raise RuntimeError("rpc-ps: waited 300 s for the other trainer's step to finish")
    try:
        return rref.local_value().forward(x)
    except BaseException:
        _step_lock.release()
        raise


def release_step() -> None:
    _step_lock.release()


def start_barrier() -> None:
    _start.wait()


def rpc_main(rank: int, kind: str, sched: dict, out_dir: str, port: int) -> None:
    import torch
    import torch.distributed.autograd as dist_autograd
    from torch.distributed import rpc
    from torch.distributed.optim import DistributedOptimizer

    os.environ.update(LOOPBACK_ENV, MASTER_PORT=str(port))
    set_threads(MULTI_THREADS)
    options = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=8, rpc_timeout=300, init_method=f"tcp://127.0.0.1:{port}"
    )
    name = "ps" if rank == 0 else f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=WORKERS + 1, rpc_backend_options=options)
    try:
        if rank == 0:
            return  # the PS serves RPCs until every trainer called rpc.shutdown()
        ps_rref = rpc.remote("ps", get_parameter_server, args=(kind,))
        param_rrefs = rpc.rpc_sync("ps", call_method, args=("get_param_rrefs", ps_rref))
        opt = DistributedOptimizer(torch.optim.SGD, param_rrefs, lr=LR)
        batches = make_batches(kind, PER_WORKER[kind], seed=rank)

        def step(i: int) -> None:
            x, y = batches[i % len(batches)]
            with dist_autograd.context() as context_id:
                out = rpc.rpc_sync("ps", locked_forward, args=(ps_rref, x))
                try:
                    loss = loss_of(out, y)
                    dist_autograd.backward(context_id, [loss])
                    opt.step(context_id)
                finally:
                    rpc.rpc_sync("ps", release_step)

        rpc.rpc_sync("ps", start_barrier)
        write(out_dir, rank, {"windows": timed_windows(step, **sched)})
    finally:
        rpc.shutdown()


# -- zps -----------------------------------------------------------------------------------------------------------
def overlap_available() -> bool:
    from zps import worker

    # __init__'s: the class's own signature is its __new__'s (optimizer, *args, **kwargs)
    return "overlap" in inspect.signature(worker.DistributedOptimizer.__init__).parameters


def zps_worker(kind: str, sched: dict, overlap: bool, clip: bool = False) -> None:
    import torch

    from zps import worker

    set_threads(MULTI_THREADS)
    client = worker.init()
    model = make_model(kind)
    opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, overlap=overlap)
    step = local_step(model, opt, make_batches(kind, PER_WORKER[kind], seed=1 + client.rank),
                      (lambda: opt.clip_grad_norm_(CLIP)) if clip else None)
    client.rendezvous.barrier("bench-start")
    windows = timed_windows(step, **sched)
    if client.rank == 0:
        C.emit_result({"windows": windows})
    worker.shutdown()


# -- running the contenders ------------------------------------------------------------------------------------------
def spawn_group(target: Callable, nprocs: int, args: tuple, timeout: float) -> None:
    """Start ``nprocs`` spawned processes ``target(rank, *args)`` and wait for all of them.

    The group fails as a unit: when one rank exits non-zero the others (stuck in a collective or an RPC) are ended
    at once rather than at the deadline; at the deadline every rank still running is ended. Raises on failure.
    """
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args), daemon=False) for rank in range(nprocs)]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in procs):
            bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if bad:
                raise RuntimeError(f"ranks exited with codes {bad}; ending the others")
            if time.monotonic() > deadline:
                late = [i for i, p in enumerate(procs) if p.is_alive()]
                raise RuntimeError(f"ranks {late} still running after {timeout:.0f}s")
            mp.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=1.0)
        failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"ranks exited with codes {failed}")
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def _single_entry(rank: int, kind: str, sched: dict, out_dir: str, threads: int) -> None:
    single_main(kind, sched, out_dir, threads)


def run_contender(name: str, kind: str, sched: dict, timeout: float) -> dict[str, Any]:
    """Returns {"rates": samples/s per window, ...}."""
    global_batch = PER_WORKER[kind] * WORKERS
    steps = sched["steps"]
    with tempfile.TemporaryDirectory(prefix="zps-bench-") as out_dir:
        if name.startswith("single"):
            threads = 1 if "1 thread" in name else SINGLE_THREADS
            spawn_group(_single_entry, 1, (kind, sched, out_dir, threads), timeout)
            windows = json.loads(Path(out_dir, "0.json").read_text())["windows"]
            return {"rates": [global_batch * steps / w for w in windows]}
        if name.startswith("ddp/gloo"):
            spawn_group(ddp_main, WORKERS, (kind, sched, out_dir, C.free_port(), "clip" in name), timeout)
            windows = json.loads(Path(out_dir, "0.json").read_text())["windows"]
            return {"rates": [global_batch * steps / w for w in windows]}
        if name == "rpc-ps":
            spawn_group(rpc_main, WORKERS + 1, (kind, sched, out_dir, C.free_port()), timeout)
            per_trainer = [json.loads(Path(out_dir, f"{r}.json").read_text())["windows"] for r in range(1, WORKERS + 1)]
            rates = [sum(PER_WORKER[kind] * steps / w for w in ws) for ws in zip(*per_trainer, strict=False)]
            return {"rates": rates}
    if name.startswith("zps"):
        servers = int(name.split("S=")[1].split(",")[0].rstrip(")"))
        overlap = ", overlap" in name
        args = [
            "--role-zps-worker",
            kind,
            "--warmup",
            str(sched["warmup"]),
            "--windows",
            str(sched["windows"]),
            "--steps",
            str(steps),
        ] + (["--overlap"] if overlap else []) + (["--clip"] if ", clip" in name else [])
        env = {"OMP_NUM_THREADS": str(MULTI_THREADS)}
        if "no shm" in name:
            env.update(C.shm_option()[1])
        zps_args = ["--bsp-sum", "arrival"] if ", arrival" in name else []
        result = C.run_zps(__file__, args, servers=servers, workers=WORKERS, mode="bsp", env=env, timeout=timeout,
                           zps_args=zps_args)
        return {"rates": [global_batch * steps / w for w in result["windows"]]}
    raise ValueError(name)


def main(argv: list[str] | None = None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn", "lm"], choices=["mlp", "cnn", "lm"])
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--windows", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed window")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="times each contender is started, in turn (the windows of all rounds are pooled)",
    )
    parser.add_argument("--contenders", nargs="+", default=None, help="run only these (names as in the table)")
    parser.add_argument("--role-zps-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--overlap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--clip", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fidelity", action="store_true",
                        help="also the costs of DDP fidelity: clipping by the global norm (ddp/gloo and zps, "
                             "'clip'), and BSP summed in arrival order against rank order ('arrival')")
    args = parser.parse_args(argv)
    sched = {
        "warmup": args.warmup or (3 if args.quick else 5),
        "windows": args.windows or (3 if args.quick else 4),
        "steps": args.steps or (5 if args.quick else 8),
    }
    rounds = args.rounds or (1 if args.quick else 2)
    if args.role_zps_worker:
        zps_worker(args.role_zps_worker, sched, args.overlap, args.clip)
        return {}

    started, load_before = time.monotonic(), C.load_avg()
    has_overlap = overlap_available()
    shm_on, _, shm_note = C.shm_option()
    names = ["single", "single (1 thread)", "ddp/gloo", "rpc-ps", "zps (S=1, no overlap)", "zps (S=2, no overlap)"]
    if has_overlap:
        names += ["zps (S=1, overlap)", "zps (S=2, overlap)"]
    if shm_on is not None:
        names.append("zps (S=2, overlap, no shm)" if has_overlap else "zps (S=2, no overlap, no shm)")
    if args.fidelity:
        names += ["ddp/gloo (clip)", "zps (S=2, no overlap, clip)", "zps (S=2, overlap, clip)",
                  "zps (S=2, no overlap, arrival)"]
    if args.contenders:
        names = [n for n in names if any(c in n for c in args.contenders)]
    timeout = 300 if args.quick else 600
    results: dict[str, dict[str, Any]] = {}
    sections = [
        "### training: samples/s, same model and global batch on this machine",
        "",
        f"SGD lr {LR}; each contender started {rounds} time(s), in turn; each time {sched['warmup']} warm-up "
        "steps, then "
        f"{sched['windows']} windows of {sched['steps']} steps; median of all windows. Threads: the single "
        f"process {SINGLE_THREADS} intra-op threads ('single (1 thread)': 1); every process of the multi-process "
        f"contenders (ddp, rpc-ps, zps workers and servers) {MULTI_THREADS}. "
        f"{WORKERS} workers x {PER_WORKER['mlp']} samples for mlp and cnn, x {PER_WORKER['lm']} 64-byte windows "
        "for lm (single: the global batch).",
        "",
        "rpc-ps runs the whole model on the PS (the tutorial's design); its trainers take turns holding the "
        "PS model from "
        "forward to optimizer step, because concurrent steps fail with an in-place modification error "
        "(pytorch/tutorials#2095; serialisation as in pytorch/examples#842).",
        "",
        "zps rows run with zps's defaults (its same-host shared-memory path included, where it exists) unless they say "
        "'no shm'. " + shm_note + ".",
    ]
    for kind in args.models:
        rows_data: dict[str, dict[str, Any]] = {name: {"rates": [], "loads": [], "errors": []} for name in names}
        for round_ in range(rounds):
            for name in names:
                r = rows_data[name]
                load = C.load_avg()
                print(f"[{kind}] round {round_ + 1}/{rounds}: measuring {name} (load {load}) ...", flush=True)
                try:
                    rates = run_contender(name, kind, sched, timeout)["rates"]
                    print(f"[{kind}] {name}: {C.fmt(C.median(rates), 1)} samples/s", flush=True)
                    r["rates"].extend(rates)
                except Exception as exc:
                    print(f"[{kind}] {name} failed: {exc}", flush=True)
                    r["errors"].append(str(exc).splitlines()[0])
                r["loads"].append(load)
        for r in rows_data.values():
            r["median"] = C.median(r["rates"]) if r["rates"] else None
            ones = sorted(float(x.split()[0]) for x in r["loads"] if x != "?")
            r["load"] = (f"{ones[0]:.2f}" if ones[0] == ones[-1] else f"{ones[0]:.2f}-{ones[-1]:.2f}") if ones else "?"
            if r["errors"]:
                r["error"] = r["errors"][0]
        results[kind] = rows_data
        ddp = rows_data.get("ddp/gloo", {}).get("median")
        rpcps = rows_data.get("rpc-ps", {}).get("median")
        single = rows_data.get("single", {}).get("median")
        rows = []
        for name, r in rows_data.items():
            m = r["median"]
            spread = f"{min(r['rates']):,.0f}-{max(r['rates']):,.0f}" if r["rates"] else r.get("error", "failed")
            rows.append([name, C.fmt(m, 1), spread, C.ratio(m, single), C.ratio(m, ddp), C.ratio(m, rpcps), r["load"]])
        tensors = list(make_model(kind).parameters())
        params = sum(p.numel() for p in tensors)
        sections += [
            "",
            f"#### {kind} ({params / 1e6:.2f}M parameters in {len(tensors)} tensors, global batch "
            f"{PER_WORKER[kind] * WORKERS})",
            "",
            C.md_table(
                [
                    "contender",
                    "samples/s",
                    "window range",
                    "vs single",
                    "vs ddp/gloo",
                    "vs rpc-ps",
                    "1-min load at starts",
                ],
                rows,
            ),
        ]
        verdicts = []
        for name, r in rows_data.items():
            if name.startswith("zps") and r["median"]:
                parts = []  # against each baseline this run measured
                if ddp:
                    parts.append(f"{r['median'] / ddp:.2f}x ddp ({'met' if r['median'] >= ddp else 'MISSED'} >= 1.0x)")
                if rpcps:
                    met = "met" if r["median"] >= 3 * rpcps else "MISSED"
                    parts.append(f"{r['median'] / rpcps:.2f}x rpc-ps ({met} >= 3x)")
                verdicts.append(f"{name}: {', '.join(parts) or 'no baseline'}")
        for s in (1, 2):
            on = rows_data.get(f"zps (S={s}, overlap)", {}).get("median")
            off = rows_data.get(f"zps (S={s}, no overlap)", {}).get("median")
            if on and off:
                verdicts.append(
                    f"overlap vs no overlap, S={s}: {on / off:.2f}x ({'met' if on > off else 'MISSED'} > 1.0x)"
                )
        if not has_overlap:
            verdicts.append("overlap: not available yet (worker.DistributedOptimizer has no `overlap` option)")
        sections += [""] + [f"- {v}" for v in verdicts]
    md = "\n".join(sections)
    return C.finish(
        "training",
        md,
        {"schedule": sched, "rounds": rounds, "results": results, "overlap_available": has_overlap},
        args.json,
        started,
        load_before,
    )


if __name__ == "__main__":
    main()
