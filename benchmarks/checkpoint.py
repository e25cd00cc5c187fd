"""What checkpoints cost: saving and loading a large model with Adam's state, beside plain safetensors doing the
same in the same run; and training throughput with a checkpoint every 30 s beside none.

    .venv/bin/python benchmarks/checkpoint.py [--quick] [--params 100000000] [--runs 3] [--json out.json]

* save: a 1-server, 1-worker job (threads of this process, real sockets) holds the parameters with Adam's state;
  worker 0 asks for a checkpoint with a step's push; from that push until the coordinator's manifest is on disk,
  less what a step without a checkpoint takes (the server copies each key at the step, then writes and fsyncs its
  part in a thread; the worker writes its part). Baseline: ``safetensors.torch.save_file`` of the same tensors
  (values, exp_avg, exp_avg_sq, step) plus an fsync.
* load: the server's restore of every key from that checkpoint (values and optimizer state, read by ranges), beside
  ``safetensors.torch.load_file`` of the same tensors copied into memory.
* throughput: the 4.8M-parameter MLP of benchmarks/training.py, BSP, 2 workers x 1 server, trained for the same
  wall time with ``--checkpoint-every 30s`` and without (one checkpoint every 30 s has to be amortised).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from tests.helpers import local_cluster  # noqa: E402
from zps.protocol import checkpoint as ckpt  # noqa: E402

CHUNK = 4 * 1024 * 1024 // 4  # elements per tensor: one chunk each


def model(params: int) -> dict[str, torch.Tensor]:
    count = max(1, params // CHUNK)
    return {f"layer{i}.weight": torch.randn(CHUNK) for i in range(count)}


def plain_save(tensors: dict[str, torch.Tensor], directory: Path) -> float:
    path = directory / "plain.safetensors"
    started = time.monotonic()
    save_file(tensors, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return time.monotonic() - started


def zps_save_and_load(params: int, directory: Path) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(seconds to save, seconds to load every key back, the tensors the server held)."""
    from zps.ps._checkpoint import Restore

    tensors = model(params)
    with local_cluster(1, 1, "bsp", checkpoint_dir=str(directory), checkpoint_every="1000000") as cluster:
        (client,) = cluster.clients(shm=False)
        try:
            client.declare(tensors, ("Adam", [{"lr": 1e-3}]))
            held = {n: torch.zeros_like(t) for n, t in tensors.items()}
            grads = {n: torch.ones_like(t) for n, t in tensors.items()}
            client.push_pull(grads, held, 0).result()  # Adam's state exists from here on
            steps = []
            for step in (1, 2):  # what a step costs without a checkpoint, subtracted below
                begun = time.monotonic()
                client.push_pull(grads, held, step).result()
                steps.append(time.monotonic() - begun)
            started = time.monotonic()
            client.push_pull(grads, held, 3, checkpoint=4).result()
            # the worker's part (this client has no residuals: an empty part, as the worker library writes it)
            path = ckpt.directory(directory, 4) / ckpt.part_name("worker", 0)
            size = ckpt.save_part(path, {}, {"checkpoint": 4, "steps": 4, "script": {}})
            info = {"step": 4, "params": [[n, [t.numel()]] for n, t in tensors.items()], "servers": [0]}
            client.rendezvous.report_saved(4, path.name, size, info)
            manifest = ckpt.directory(directory, 4) / ckpt.MANIFEST
            while not manifest.exists():
                if time.monotonic() - started > 600:
                    raise RuntimeError("the checkpoint never completed")
                time.sleep(0.005)  # polling the file system for the manifest, bounded
            saved = time.monotonic() - started - min(steps)
            server = cluster.servers[0]
            state = {}
            for s in server.shard.keys.values():
                assert s.param is not None
                state[f"{s.key}.param"] = s.param.clone()
                for name, value in server.shard.keys.optimizers.by_group[s.group].state[s.param].items():
                    state[f"{s.key}.state.{name}"] = value.clone()
        finally:
            client.close()
    os.sync()  # the kernel's write-back of what was just saved must not run inside the timed load
    started = time.monotonic()
    restore = Restore(ckpt.resolve(directory))
    for entry in restore.manifest.body["servers"][0]["keys"]:
        restore.load(*entry)
    return saved, time.monotonic() - started, state


def plain_load(directory: Path) -> float:
    """Into memory a job can use (load_file maps the file; the copy reads it), as the server's restore does."""
    os.sync()
    started = time.monotonic()
    loaded = {name: tensor.clone() for name, tensor in load_file(str(directory / "plain.safetensors")).items()}
    assert loaded
    return time.monotonic() - started


def throughput(seconds: float, checkpoint: bool, directory: Path) -> float:
    extra = ["--checkpoint-dir", str(directory), "--checkpoint-every", "30s"] if checkpoint else []
    result = C.run_zps(C.BENCH_DIR / "checkpoint_worker.py", ["--seconds", str(seconds)], servers=1, workers=2,
                       zps_args=extra)
    return float(result["steps_per_second"])


def main() -> None:
    parser = C.base_parser(__doc__)
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--train-seconds", type=float, default=65.0)
    args = parser.parse_args()
    if args.quick:
        args.params, args.runs, args.train_seconds = 20_000_000, 1, 35.0
    started, load_before = time.monotonic(), C.load_avg()
    save_rows, load_rows = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(dir=str(C.ROOT)) as tmp:  # the same disk as a job's --checkpoint-dir
            root = Path(tmp)
            zsave, zload, state = zps_save_and_load(args.params, root / "zps")
            psave = plain_save(state, root)
            pload = plain_load(root)
            save_rows.append((zsave, psave))
            load_rows.append((zload, pload))
            del state
    zs, ps = (statistics.median(r[i] for r in save_rows) for i in (0, 1))
    zl, pl = (statistics.median(r[i] for r in load_rows) for i in (0, 1))
    with tempfile.TemporaryDirectory(dir=str(C.ROOT)) as tmp:
        plain_rate = throughput(args.train_seconds, False, Path(tmp))
        ckpt_rate = throughput(args.train_seconds, True, Path(tmp))
    gib = args.params * 12 / 2**30
    rows = [
        ["save", f"{zs:.2f} s", f"{ps:.2f} s", f"{zs / ps:.2f}x", "<= 1.2x"],
        ["load", f"{zl:.2f} s", f"{pl:.2f} s", f"{zl / pl:.2f}x", "<= 1.2x"],
        ["training steps/s, checkpoint every 30 s", f"{ckpt_rate:.1f}", f"{plain_rate:.1f} (none)",
         f"{ckpt_rate / plain_rate:.2f}x", ">= 0.95x"],
    ]
    md = "\n".join([
        f"### checkpoint: {args.params / 1e6:.0f}M float32 parameters with Adam ({gib:.2f} GiB), medians of "
        f"{args.runs} run(s)",
        "",
        C.md_table(["what", "zps", "baseline in the same run", "ratio", "target"], rows),
        "",
        "Baselines: safetensors.torch.save_file + fsync / load_file of the same tensors; training without "
        f"checkpoints for the same {args.train_seconds:.0f} s. Load average at the start: {load_before}.",
    ])
    C.finish("checkpoint", md, {"save": save_rows, "load": load_rows, "plain_rate": plain_rate,
                                 "ckpt_rate": ckpt_rate}, args.json, started, load_before)


if __name__ == "__main__":
    main()
