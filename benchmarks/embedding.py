"""Embedding tables: a server's rows/s against the machine's limit, a batch's round trip, the click model end to end
against one process holding the whole table, and (``--scale``) a 50M-row table spread over two servers.

1. server: one server's shard service fed wire-form ROWS_PULL and ROWS_PUSH messages in this process (header read,
   ids checked, index lookup, gather and encode; decode and the optimizer's update), 4096-id batches (their
   distinct ids: fewer under Zipf) over a table of ``--rows`` rows, dim 16 and 64, Zipf(1.1) and uniform ids;
   against the limit, ``index_select`` / ``index_add_`` of the same distinct rows of an in-memory tensor of the
   same size. Interleaved (zps pull, limit pull, zps push, limit push in every repeat), medians.
2. round trip: 1 server + 1 worker (``zps run``), a 4096-id batch pulled (``EmbeddingTable.lookup``) and its
   gradient pushed (backward, then waiting for the acknowledgement: two round trips), and the same batches in a
   training loop (each batch's push in flight while the next is pulled: one round trip a batch), against twice
   the limit of part 1 plus one round trip of the same worker (a pull of one row).
3. ctr: examples/ctr.py's samples/s with 1 worker x 1 server and 2 x 2 against ``--baseline`` (one process,
   nn.EmbeddingBag(sparse=True) holding the whole table, torch.optim.Adagrad), and the table's bytes on the wire
   per sample against a dense push and pull of the same table; runs interleaved, medians.
4. ``--scale``: 50M rows x 16 (3.2 GB) with row-wise Adagrad spread over 2 servers by 2 workers that push
   batches of new ids; each worker's peak RSS (ru_maxrss: the whole process, torch included) against the table's
   bytes.

    python benchmarks/embedding.py [--quick] [--scale] [--parts server roundtrip ctr] [--json out.json]
    python benchmarks/embedding.py --scale --parts        # the 50M-row run alone
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks import _common as C  # noqa: E402
from benchmarks.memory import find_servers  # noqa: E402

BATCH = 4096
STEADY = 8  # batches of one timed training loop (part 2)
_IDS = itertools.count(1)


def batches(kind: str, rows: int, count: int, seed: int) -> list[Any]:
    """``count`` batches of 4096 ids in [0, rows), Zipf(1.1) (by inverse CDF, ranks scattered) or uniform."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        if kind == "uniform":
            ids = rng.integers(0, rows, BATCH)
        else:
            u = rng.random(BATCH)
            ranks = np.minimum(rows - 1, ((rows ** -0.1 - 1.0) * u + 1.0) ** (1.0 / -0.1) - 1.0).astype(np.int64)
            ids = (ranks * 2654435761) % rows  # frequent ids spread over the table, not its first rows
        out.append(torch.from_numpy(ids.astype(np.int64)))
    return out


# -- 1. the server's rows/s ----------------------------------------------------------------------------------------
def server_part(rows: int, repeats: int) -> list[dict[str, Any]]:
    import torch

    from zps.protocol import tables as wire
    from zps.protocol.config import JobConfig
    from zps.protocol.messages import Kind, Message, parse_frames
    from zps.protocol.rendezvous import Topology
    from zps.protocol.tables import TableSpec
    from zps.ps._guard import Guard
    from zps.ps._metrics import ServerMetrics
    from zps.ps._replicas import Replication
    from zps.ps.shard import Shard

    torch.set_num_threads(1)
    results = []
    for dim in (16, 64):
        job = JobConfig(num_servers=1, num_workers=1, mode="bsp", timeout=60.0)
        topology = Topology(role="server", rank=0, num_servers=1, num_workers=1, servers=("tcp://127.0.0.1:1",),
                            mode="bsp", staleness=0)
        metrics = ServerMetrics("server:0")
        shard = Shard("server:0", job, topology, metrics, Guard("server:0", metrics),
                      Replication(0, 1, 0, "server:0", lambda s, m: None, metrics))
        spec = TableSpec("bench", dim, optimizer="sgd", hp={"lr": 0.01})

        declare = Message(Kind.TABLE, id=next(_IDS), src="worker:0", body=spec.to_body())
        ((_, reply),) = shard.handle(b"w", parse_frames([bytes(f) for f in declare.to_frames()]))
        assert reply.kind is Kind.OK, reply.body
        table = shard.tables.by_key[spec.key]
        for at in range(0, rows, 1 << 18):  # every row stored (the first update creates it)
            ids = torch.arange(at, min(rows, at + (1 << 18)))
            table.store.apply(ids, torch.zeros(ids.numel(), dim), None, 0)
        dense = torch.zeros(rows, dim)
        step = [table.version]
        for dist in ("zipf", "uniform"):
            distinct = [torch.unique(b) for b in batches(dist, rows, repeats, seed=dim)]
            times: dict[str, list[float]] = {"pull": [], "push": [], "select": [], "add": []}
            for ids in distinct:
                grads = torch.randn(ids.numel(), dim)
                pull = Message(Kind.ROWS_PULL, id=next(_IDS), src="worker:0", frames=[wire.ids_frame(ids)],
                               keys=[wire.row_entry(spec.key, step[0], ids.numel(), nf=1)])
                frames, _ = wire.encode_rows(grads, "none")
                push = Message(Kind.ROWS_PUSH, id=next(_IDS), src="worker:0", frames=[wire.ids_frame(ids), *frames],
                               keys=[wire.row_entry(spec.key, step[0], ids.numel(), nf=2, codec="none")])
                pull_frames = [bytes(f) for f in pull.to_frames()]
                push_frames = [bytes(f) for f in push.to_frames()]
                began = time.perf_counter()
                shard.handle(b"w", parse_frames(pull_frames))
                times["pull"].append(time.perf_counter() - began)
                began = time.perf_counter()
                dense.index_select(0, ids)
                times["select"].append(time.perf_counter() - began)
                began = time.perf_counter()
                shard.handle(b"w", parse_frames(push_frames))
                times["push"].append(time.perf_counter() - began)
                step[0] += 1
                began = time.perf_counter()
                dense.index_add_(0, ids, grads)
                times["add"].append(time.perf_counter() - began)
            unique = C.median(d.numel() for d in distinct)
            med = {k: C.median(v) for k, v in times.items()}
            results.append({"dim": dim, "ids": dist, "distinct": unique, **{f"{k}_s": v for k, v in med.items()},
                            "pull_rows_per_s": unique / med["pull"], "push_rows_per_s": unique / med["push"],
                            "select_rows_per_s": unique / med["select"], "add_rows_per_s": unique / med["add"]})
    return results


# -- 2. a batch's round trip ---------------------------------------------------------------------------------------
def roundtrip_worker(rows: int, repeats: int, dim: int) -> None:
    import torch

    from zps import worker

    torch.set_num_threads(1)
    worker.init()
    table = worker.EmbeddingTable("bench", dim, optimizer="sgd:lr=0.01")
    for at in range(0, rows, 1 << 16):  # every row stored first
        ids = torch.arange(at, min(rows, at + (1 << 16)))
        table.lookup(ids).sum().backward()
    table.synchronize()
    out: dict[str, Any] = {}
    one = torch.tensor([1])
    for dist in ("zipf", "uniform"):
        trips, rtts, steady = [], [], []
        chosen = batches(dist, rows, repeats, seed=dim)
        for ids in chosen:
            began = time.perf_counter()
            table.rows(one)
            rtts.append(time.perf_counter() - began)
            began = time.perf_counter()
            table.lookup(ids).sum().backward()
            table.synchronize()
            trips.append(time.perf_counter() - began)
            # a training loop's steady state: this batch's push travels while the next batch is pulled (a
            # worker keeps up to two pushes in flight), so each batch costs one round trip, not two
            began = time.perf_counter()
            for again in chosen[:STEADY]:
                table.lookup(again).sum().backward()
            table.synchronize()
            steady.append((time.perf_counter() - began) / STEADY)
        out[dist] = {"batch_s": C.median(trips), "rtt_s": C.median(rtts), "steady_s": C.median(steady)}
    C.emit_result(out)


def roundtrip_part(rows: int, repeats: int) -> dict[int, Any]:
    return {dim: C.run_zps(__file__, ["--roundtrip-worker", "--rows", str(rows), "--repeats", str(repeats),
                                      "--dim", str(dim)], servers=1, workers=1, env={"OMP_NUM_THREADS": "1"})
            for dim in (16, 64)}


# -- 3. the click model ------------------------------------------------------------------------------------------
def ctr_part(steps: int, rounds: int) -> dict[str, Any]:
    example = C.ROOT / "examples" / "ctr.py"
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "1x1": [], "2x2": []}
    common = ["--steps", str(steps), "--eval-samples", "8192"]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            out = Path(tmp) / f"base-{r}.json"
            import subprocess

            subprocess.run([sys.executable, str(example), "--baseline", *common, "--out", str(out)], check=True,
                           cwd=tmp, env={**os.environ, "PYTHONPATH": str(C.ROOT), "OMP_NUM_THREADS": "2"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs["baseline"].append(json.loads(out.read_text()))
            for name, (servers, workers) in (("1x1", (1, 1)), ("2x2", (2, 2))):
                out = Path(tmp) / f"{name}-{r}.json"
                _ctr_zps(example, [*common, "--out", str(out)], servers, workers, tmp)
                runs[name].append(json.loads(out.read_text()))
    return {name: {"samples_per_second": C.median(x["samples_per_second"] for x in found),
                   "auc": C.median(x["auc"] for x in found),
                   "worker_rss_bytes": max(x["worker_rss_bytes"] for x in found),
                   "rows": found[-1]["rows"], "table_wire_bytes_per_sample": found[-1]["table_wire_bytes_per_sample"],
                   "dense_table_bytes_per_sample": found[-1]["dense_table_bytes_per_sample"]}
            for name, found in runs.items()}


def _ctr_zps(example: Path, args: list[str], servers: int, workers: int, cwd: str) -> None:
    import subprocess

    argv = [*C.zps_command(), "run", "--servers", str(servers), "--workers", str(workers), str(example), *args]
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, "PYTHONPATH": str(C.ROOT)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}")


# -- 4. 50M rows ---------------------------------------------------------------------------------------------------
def scale_worker(rows: int, batch: int, share: str) -> None:
    import torch

    from zps import worker

    torch.set_num_threads(1)
    client = worker.init()
    servers = client.topology.num_servers
    cap = int(rows / servers * 1.05)  # (the rows spread unevenly by a hair: room for it, never exceeded)
    table = worker.EmbeddingTable("scale", 16, optimizer="rowwise_adagrad:lr=0.01", max_rows=cap,
                                  client=client)
    pids = find_servers(client.config.coordinator)
    step, began = 0, time.monotonic()
    per_step = batch * client.num_workers
    while step * per_step < rows:
        start = step * per_step + client.rank * batch
        end = min(rows, start + batch)
        ids = torch.arange(start, end) if end > start else torch.arange(0, 1)  # (the last step: one row again)
        table.lookup(ids).pow(2).sum().backward()
        step += 1
    table.synchronize()
    wall = time.monotonic() - began
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(share, f"rss-{client.rank}").write_text(str(mine))
    worker.barrier("scale-done")
    stats = table.stats()
    result = {"rows": sum(s["rows"] for s in stats), "rows_per_server": [s["rows"] for s in stats], "cap": cap,
              "server_bytes": [{k: s[k] for k in ("values_bytes", "state_bytes", "index_bytes")} for s in stats],
              "server_peak_rss": [C.proc_status_kib(pid)["VmHWM"] * 1024 for pid in pids],
              "worker_peak_rss": [int(Path(share, f"rss-{r}").read_text()) for r in range(client.num_workers)],
              "steps": step, "seconds": wall, "batch": batch}
    if client.rank == 0:
        C.emit_result(result)
    worker.shutdown()


def scale_part(rows: int, batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as share:
        return C.run_zps(__file__, ["--scale-worker", "--rows", str(rows), "--batch", str(batch), "--share", share],
                         servers=2, workers=2, timeout=3600, env={"OMP_NUM_THREADS": "1"},
                         zps_args=["--timeout", "600", "--no-preload"])


# -- the report -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = C.base_parser(__doc__)
    parser.add_argument("--parts", nargs="*", default=["server", "roundtrip", "ctr"],
                        choices=["server", "roundtrip", "ctr"], help="none given: --scale alone")
    parser.add_argument("--scale", action="store_true", help="also the 50M-row run (3.2 GB of rows, ~5 GB in all)")
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1 << 16,
                        help="--scale: new ids per worker per step (65,536: examples/ctr.py's step is 2048 samples x "
                             "26 features, 53,248 ids, all new here)")
    parser.add_argument("--share", default="", help=argparse.SUPPRESS)
    parser.add_argument("--roundtrip-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scale-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.roundtrip_worker:
        roundtrip_worker(args.rows, args.repeats, args.dim)
        return {}
    if args.scale_worker:
        scale_worker(args.rows, args.batch, args.share)
        return {}
    started, load = time.monotonic(), C.load_avg()
    rows = args.rows or (200_000 if args.quick else 2_000_000)
    repeats = args.repeats or (15 if args.quick else 41)
    data: dict[str, Any] = {"rows": rows, "repeats": repeats}
    md: list[str] = [f"# Embedding tables ({rows:,} rows, {BATCH}-id batches)\n" if args.parts else
                     "# Embedding tables\n"]
    if "server" in args.parts:
        measured = data["server"] = server_part(rows, repeats)
        md.append("## 1. One server's rows/s against index_select / index_add_ of the same rows (medians)\n")
        md.append(C.md_table(
            ["dim", "ids", "distinct", "pull rows/s", "limit", "ratio", "push rows/s", "limit", "ratio"],
            [[r["dim"], r["ids"], int(r["distinct"]), f"{r['pull_rows_per_s']:,.0f}", f"{r['select_rows_per_s']:,.0f}",
              C.ratio(r["pull_rows_per_s"], r["select_rows_per_s"]), f"{r['push_rows_per_s']:,.0f}",
              f"{r['add_rows_per_s']:,.0f}", C.ratio(r["push_rows_per_s"], r["add_rows_per_s"])] for r in measured]))
    if "roundtrip" in args.parts:
        trips = data["roundtrip"] = roundtrip_part(rows, repeats)
        limits = {(r["dim"], r["ids"]): r["select_s"] + r["add_s"] for r in data.get("server", [])}
        md.append("\n## 2. A batch pulled and pushed by a worker (1 server, 1 worker, separate processes)\n")
        body = []
        for dim, by_ids in trips.items():
            for dist, t in by_ids.items():
                limit = limits.get((dim, dist))
                bound = None if limit is None else 2 * limit + t["rtt_s"]
                body.append([dim, dist, f"{t['batch_s'] * 1e3:.2f}", f"{t['steady_s'] * 1e3:.2f}",
                             f"{t['rtt_s'] * 1e3:.2f}", "" if limit is None else f"{limit * 1e3:.3f}",
                             "" if bound is None else f"{bound * 1e3:.2f}", C.ratio(t["batch_s"], bound),
                             C.ratio(t["steady_s"], bound)])
        md.append(C.md_table(["dim", "ids", "pull+push ms, alone", "in a loop", "round trip ms", "limit ms",
                              "2 x limit + rtt ms", "ratio alone", "ratio in a loop"], body))
    if "ctr" in args.parts:
        ctr = data["ctr"] = ctr_part(40 if args.quick else 150, 1 if args.quick else 3)
        base = ctr["baseline"]["samples_per_second"]
        md.append("\n## 3. examples/ctr.py (medians of interleaved runs)\n")
        md.append(C.md_table(
            ["run", "samples/s", "vs one process", "AUC", "rows", "worker peak RSS MiB", "table bytes/sample",
             "vs a dense pull+push"],
            [[name, f"{r['samples_per_second']:,.0f}", C.ratio(r["samples_per_second"], base), f"{r['auc']:.4f}",
              f"{r['rows']:,}", f"{r['worker_rss_bytes'] / 2**20:.0f}",
              "" if r["table_wire_bytes_per_sample"] is None else f"{r['table_wire_bytes_per_sample']:,.0f}",
              "" if r["table_wire_bytes_per_sample"] is None else
              C.ratio(r["table_wire_bytes_per_sample"], r["dense_table_bytes_per_sample"], 5)]
             for name, r in ctr.items()]))
    if args.scale:
        scale = data["scale"] = scale_part(50_000_000 if not args.rows else args.rows, args.batch)
        table_bytes = scale["rows"] * 16 * 4
        worst = max(scale["worker_peak_rss"])
        md.append("\n## 4. Scale: one table spread over 2 servers by 2 workers\n")
        md.append(C.md_table(["rows", "table GB", "per server", "server peak RSS GB", "largest worker peak RSS MiB",
                              "worker RSS / table", "seconds"],
                             [[f"{scale['rows']:,}", f"{table_bytes / 1e9:.2f}",
                               ", ".join(f"{r:,}" for r in scale["rows_per_server"]),
                               ", ".join(f"{b / 1e9:.2f}" for b in scale["server_peak_rss"]),
                               f"{worst / 2**20:.0f}", f"{worst / table_bytes:.3f}", f"{scale['seconds']:.0f}"]]))
    return C.finish("embedding", "\n".join(md), data, args.json, started, load)


if __name__ == "__main__":
    main()
