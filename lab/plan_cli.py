"""``zps plan``, the command: the model of a script (:mod:`.plan_probe`), its predicted steps (:mod:`.planner`), the
servers it needs and the verdict against all-reduce and BytePS (:mod:`.plan_compare`), printed as tables."""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import replace
from typing import Any

from zps.protocol.simulation import NetSpec

from .plan_compare import RING, SPARSE, gib, table_elements, tables_left_out, verdict, worker_memory
from .planner import (
    WITHIN,
    Setup,
    calibrate,
    key_sizes,
    model_from,
    parse_counts,
    predict,
    server_counts,
    servers_needed,
    suggestions,
    synthetic_model,
)
from .table_plan import parse_table, row_cost


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"


def main(args: Any) -> int:
    """``zps plan`` (see :func:`add_arguments`)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 150)
    try:
        workers, servers = parse_counts(args.workers), parse_counts(args.servers)
        NetSpec.parse(args.net)
        if not 0 <= args.within < 1000:
            raise ValueError(f"--within {args.within}: expected a percentage >= 0")
        if not args.worker_memory >= 0:
            raise ValueError(f"--worker-memory {args.worker_memory}: expected GiB >= 0 (0: not stated)")
        model = (model_from(args.model, shlex.split(args.model_args)) if args.model
                 else synthetic_model(args.params, args.tensors, args.compute_ms / 1000))
        model = replace(model, tables=tuple(parse_table(t) for t in args.table or ()))
    except ValueError as e:
        print(f"zps plan: {e}", file=sys.stderr)
        return 2
    if args.compute_ms:
        model = replace(model, compute=args.compute_ms / 1000)
    batch = args.batch_size or model.batch
    optimizer = args.optimizer or model.optimizer or "adam:lr=1e-3"
    within = args.within / 100
    sizes = key_sizes(model)
    costs = calibrate(args.codec, args.pull_codec, optimizer, sizes, args.compress_min)
    topk = calibrate("topk:ratio=0.01", "int8", optimizer, sizes, args.compress_min)
    if model.tables:
        costs = replace(costs, row=row_cost())
        topk = replace(topk, row=costs.row)
    cores = (os.cpu_count() or 1) if args.local else 0

    def setup(w: int, s: int) -> Setup:
        return Setup(w, s, args.net, args.codec, args.pull_codec, args.mode, args.compress_min, cores,
                     args.worker_memory * 2**30)

    measured = ("its first steps under zps plan's stand-in, median" if args.model and os.path.isfile(args.model)
                else "given" if args.compute_ms else "not measured: give --compute-ms")
    console.print(f"model: {model.name}: {sum(model.sizes):,} parameters in {len(model.sizes)} tensors ({len(sizes)} "
                  f"keys), compute {model.compute * 1e3:.1f} ms per step{f' (batch {batch})' if batch else ''} "
                  f"({measured}; one process on this host); servers' optimizer {optimizer}"
                  f"{' (the script' + chr(39) + 's)' if not args.optimizer and model.optimizer else ''}; "
                  f"{args.mode}, net {args.net or 'unlimited'}, codec {args.codec or 'none'} / pull "
                  f"{args.pull_codec or 'none'}", highlight=False)
    shown = ("compute", "encode", "push", "apply", "pull", "decode") + (("tables",) if model.tables else ())
    table = Table("workers", "servers", "step ms", *shown, "bottleneck", "samples/s" if batch else "steps/s",
                  title="predicted, ms per step")
    for w in workers:
        for s in servers:
            p = predict(model, setup(w, s), costs)
            table.add_row(str(w), str(s), _ms(p.step), *(_ms(p.parts[k]) for k in shown), p.bottleneck,
                          f"{w * (batch or 1) / p.step:,.1f}")
    console.print(table)
    counts = {w: server_counts(model, setup(w, servers[0]), costs) for w in workers}
    needs = {w: servers_needed(model, setup(w, servers[0]), costs, within, tried=counts[w]) for w in workers}
    if len(workers) > 1 or len(servers) > 1:
        need_table = Table("workers", "servers are the bottleneck at", "servers needed", "step ms there",
                           "fastest (servers)", title=f"servers needed (within {args.within:g}% of the fastest)")
        for w in workers:
            bound = [s for s in servers if predict(model, setup(w, s), costs).servers_bound]
            need = needs[w]
            need_table.add_row(str(w), f"S <= {max(bound)}" if bound else "none of these", str(need.servers),
                               _ms(need.step), f"{_ms(need.best)} ({need.best_servers})")
        console.print(need_table)
    console.print(needs[workers[-1]].definition(), highlight=False)
    sparse = (SPARSE,) if model.tables else ()
    verdicts = Table("workers", "servers", "zps", "zps, S needed", "ring all-reduce", "BytePS, k=S", *sparse,
                     "fastest (within 5%: a tie)", "zps <= ring from",
                     title="parameter servers, all-reduce or BytePS: ms per step (formulas: docs/experiments.md, "
                     "'zps plan', 'PS, all-reduce or BytePS'; OOM: more than --worker-memory)")
    last = None

    def cell(c: Any) -> str:
        return _ms(c.step) + ("" if c.fits else " (OOM)")

    for w in workers:
        for s in servers:
            v = last = verdict(model, setup(w, s), costs, within, tried=counts[w])
            by = {c.name: c for c in v.candidates}
            verdicts.add_row(str(w), str(s), _ms(v.ps.step), f"{_ms(v.need.step)} ({v.need.servers})",
                             cell(by[RING]), cell(by[f"BytePS (k={s})"]), *(cell(by[n]) for n in sparse), v.says(),
                             "the ring: OOM" if not by[RING].fits else
                             f"S = {v.matches_ring}" if v.matches_ring else "never")
    console.print(verdicts)
    if model.tables:
        _tables_note(console, model, setup(workers[-1], servers[0]), args.worker_memory)
    assert last is not None
    base = last.ps
    ring = next(c for c in last.candidates if c.name == RING)
    at = last.setup
    console.print(f"W={at.workers}, S={at.servers}: {last.says()} ({_ms(last.fastest.step)} ms per step); zps "
                  f"{_ms(base.step)} ms, the ring {_ms(ring.step)} ms (transfer "
                  f"{_ms(ring.parts['transfer'])}, latency {_ms(ring.parts['latency'])}); "
                  + ("the ring cannot hold the model in --worker-memory." if not ring.fits else
                     f"zps is no slower than the ring from {last.matches_ring} servers."
                     if last.matches_ring else f"zps stays slower than the ring at any server count up to "
                     f"{len(counts[at.workers])}."), highlight=False)
    console.print(f"zps's bottleneck there is {base.bottleneck}. What would move it:", highlight=False)
    for change, step in suggestions(model, at, costs, topk):
        console.print(f"  {change}: {_ms(step)} ms ({base.step / step:.2f}x)", highlight=False)
    return 0


def _tables_note(console: Any, model: Any, at: Setup, stated: float) -> None:
    """What the verdict does with the tables: how all-reduce holds and moves them, and the memory it needs."""
    if tables_left_out(model):
        console.print("The ring and BytePS are predicted without the tables whose ROWS is not given, in time and "
                      "in memory (--table IDS:DIM:ROWS; zps's steps include them): a dense table would be all-reduced "
                      "and held whole, which these formulas then leave out.", highlight=False)
    whole = table_elements(model)
    if whole:
        console.print(f"With the tables, the ring and BytePS all-reduce each table whole every step (an nn.Embedding's "
                      f"dense gradient: {4 * whole / 1e6:,.1f} MB), and '{SPARSE}' all-gathers every worker's "
                      f"distinct rows (nn.Embedding(sparse=True) under DDP over gloo). A worker holds at least "
                      f"{gib(worker_memory(model, at, 'dense'))} GiB under the ring and BytePS (every table whole, and "
                      f"its dense gradient), {gib(worker_memory(model, at, 'sparse'))} GiB under sparse DDP, "
                      f"{gib(worker_memory(model, at, 'zps'))} GiB under zps (float32 values and gradients; "
                      "optimizer state on top)"
                      + (f"; --worker-memory {stated:g} GiB." if stated else
                         ": give --worker-memory GIB to rule out what a worker cannot hold."), highlight=False)
        if stated and worker_memory(model, at, "sparse") > stated * 2**30:
            console.print(f"All-reduce cannot train this model on workers of {stated:g} GiB: every worker would "
                          "hold each table whole; zps's workers hold only their batch's rows.", highlight=False)


def add_arguments(p: Any) -> None:
    p.add_argument("--model", help="a zps training script (its first steps run under a planning stand-in: the "
                                   "model, its compute, batch and optimizer come from them), or module:function "
                                   "returning a torch.nn.Module (give --compute-ms)")
    p.add_argument("--model-args", default="", metavar="ARGS",
                   help="the script's own arguments, as one string (e.g. \"--batch-size 16\")")
    p.add_argument("--params", type=int, default=1_000_000, help="without --model: this many parameters")
    p.add_argument("--tensors", type=int, default=10, help="without --model: in this many tensors")
    p.add_argument("--compute-ms", type=float, default=0.0, help="one step's forward and backward (default: "
                                                                 "measured with --model)")
    p.add_argument("--batch-size", type=int, default=0, help="samples per worker step, for samples/s (default: "
                                                             "what the script reported)")
    p.add_argument("--workers", "-w", nargs="+", default=["4"], help="counts to predict: 4, 64,128,256 or 64..1024 "
                                                                      "(doubling)")
    p.add_argument("--servers", "-s", nargs="+", default=["2"], help="counts to predict, as --workers")
    p.add_argument("--net", default="", help="a --net spec: each role's link (default: unlimited)")
    p.add_argument("--codec", default="")
    p.add_argument("--pull-codec", default="")
    p.add_argument("--mode", default="bsp", choices=("bsp", "asp", "ssp"))
    p.add_argument("--optimizer", default="", help="the servers' optimizer (default: the script's, else "
                                                   "adam:lr=1e-3)")
    p.add_argument("--compress-min", type=int, default=1024)
    p.add_argument("--within", type=float, default=WITHIN * 100, metavar="PCT",
                   help="servers needed: the fewest whose step is within PCT%% of the fastest (default %(default)g)")
    p.add_argument("--table", action="append", metavar="IDS:DIM[:ROWS]", help="an embedding table: the distinct "
                   "ids of a worker's batch, the row width and the table's rows in all (what all-reduce would hold "
                   "whole; repeat for several tables; docs/embeddings.md)")
    p.add_argument("--worker-memory", type=float, default=0.0, metavar="GIB",
                   help="a worker's memory: architectures whose workers would hold more (all-reduce holds every "
                        "table whole) cannot train the model and are never the verdict (default: not stated)")
    p.add_argument("--local", action="store_true", help="a cluster simulated on this host (zps run): the workers "
                                                        "share its cores")
