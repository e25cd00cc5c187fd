"""``zps plan``: a step time predicted before anything runs, with its breakdown and the bottleneck named.

The model (docs/experiments.md, "zps plan"), per BSP step of a worker:

    compute + encode + push + apply + pull + decode

- **push**: every worker sends its compressed gradients (``bytes_w``, keys spread over the servers by zps's own
  sharding plan, :mod:`zps.protocol.plan`) over its link, then each server receives W shards over its one link
  (incast): ``max(max_w bytes_w / rate_w, max_s W * bytes_s / rate_s)`` plus the one-way latency and jitter of both
  links and a fixed cost per message;
- **apply**: each server, one thread, decodes W pushes and steps its optimizer over its shard; the busiest server;
- **pull**: the same links the other way, with the pull codec's bytes (the servers encode W replies); push, apply
  and pull overlap message by message (:func:`predict`'s ``pipelined``): a server answers the pulls of a worker's
  first message while the later ones still arrive;
- **encode / decode**: the codecs' own time on the worker, measured per key on this host (many small keys cost
  more than their size says).

ASP and SSP do not wait for the slowest worker: a worker's step is its own compute, codecs and transfer unless the
servers or their links, busy with every worker's requests, are slower (``max(own path, W x the server's work per
request)``). Calibration is short and local (:func:`calibrate`): the codec on the model's key sizes, the server
optimizer's step, a message round trip over loopback; the model and its compute come from the script's own first
steps (:func:`model_from`, :mod:`.plan_probe`). ``--local`` predicts a cluster simulated on this host, where W
workers share its cores. The command is :mod:`.plan_cli`; the comparison with all-reduce :mod:`.plan_compare`.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zps.protocol.plan import ParamSpec, cut_messages, make_plan
from zps.protocol.simulation import Link, NetSpec

from .table_plan import table_seconds

_ROUNDS = 5


@dataclass(frozen=True)
class Model:
    """What the plan needs of a model: its parameters' sizes, and one step's forward and backward time."""

    name: str
    sizes: tuple[int, ...]
    compute: float  # seconds, one process alone on this host
    batch: int = 0  # samples per step (0: unknown)
    optimizer: str = ""  # the script's optimizer as a spec ("": unknown)
    tables: tuple[tuple[int, ...], ...] = ()  # embedding tables: (distinct ids per worker batch, dim[, rows in all]),
    # lab/table_plan


@dataclass(frozen=True)
class Costs:
    """Per-key and per-element costs measured on this host (seconds)."""

    encode_key: float
    encode_elem: float
    decode_key: float
    decode_elem: float
    pull_encode_key: float
    pull_encode_elem: float
    pull_decode_key: float
    pull_decode_elem: float
    apply_elem: float
    message: float  # one request and reply through ZeroMQ, beside their bytes
    wire_ratio: float  # push bytes / float32 bytes for compressed keys
    pull_wire_ratio: float
    copy_key: float = 2e-6  # an uncompressed key: its bytes as they are
    copy_elem: float = 0.25e-9
    row: tuple[float, float] = (1.5e-6, 1.5e-8)  # a table row pulled and pushed at a server: a + b * dim seconds


@dataclass(frozen=True)
class Setup:
    workers: int
    servers: int
    net: str = ""
    codec: str = ""
    pull_codec: str = ""
    mode: str = "bsp"
    compress_min: int = 1024
    local_cores: int = 0  # >0: a cluster simulated on a host with this many cores
    worker_memory: float = 0.0  # bytes a worker may hold (0: not stated); all-reduce holds every table whole


@dataclass(frozen=True)
class Prediction:
    step: float
    parts: dict[str, float]
    bottleneck: str
    servers_busy: float = 0.0  # the busiest server's links and loop per step (what more servers shrink)
    workers_busy: float = 0.0  # a worker's compute, codecs and own link per step (what no server count shrinks)

    @property
    def servers_bound(self) -> bool:
        """The servers' links or loops take longer per step than a worker's own work."""
        return self.servers_busy > self.workers_busy


def _timed(fn: Callable[[], object], rounds: int = _ROUNDS) -> float:
    """The median of ``rounds`` calls after a warm-up (on a busy host: as busy as the runs it predicts will see)."""
    fn()
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def model_from(source: str, args: Sequence[str] = ()) -> Model:
    """The model of ``source``: a zps training script (a path; run under the planning stand-in for its first steps,
    :mod:`.plan_probe`, with ``args``), or ``module:function`` (a function returning a ``torch.nn.Module``; its
    compute is not measured: 0 unless ``--compute-ms`` says). ValueError says what is wrong."""
    from .plan_probe import ProbeError, probe_script

    if os.path.isfile(source) or source.endswith(".py"):
        try:
            got = probe_script(source, list(args))
        except ProbeError as exc:
            raise ValueError(str(exc)) from None
        return Model(Path(source).stem, got.sizes, got.compute, got.batch, got.optimizer)
    module_name, colon, function = source.partition(":")
    if not colon or not module_name or not function:
        raise ValueError(f"--model {source!r}: expected a script's path or module:function")
    import importlib

    sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
        for part in function.split("."):
            target = getattr(target, part)
        model = target()
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--model {source!r}: {exc}") from None
    finally:
        sys.path.remove(os.getcwd())
    if not hasattr(model, "parameters"):
        raise ValueError(f"--model {source!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return Model(source, tuple(int(p.numel()) for p in model.parameters() if p.requires_grad), 0.0)


def synthetic_model(params: int, tensors: int, compute: float) -> Model:
    """``params`` elements in ``tensors`` tensors (equal sizes)."""
    base, extra = divmod(params, tensors)
    return Model(f"{params:,} params", tuple(base + (i < extra) for i in range(tensors)), compute)


def _codec_costs(spec: str, error_feedback: bool, small: int, large: int) -> tuple[float, float, float, float, float]:
    """(encode per key, per element, decode per key, per element, bytes ratio) of ``spec``: a line through its
    times on a ``small`` and a ``large`` key (no codec: nothing to measure, zeros)."""
    import torch

    from zps.protocol.codecs import codec_factory
    from zps.protocol.tensors import encode_entry, entry_encoded

    if not spec:
        return 0.0, 0.0, 0.0, 0.0, 1.0
    out = []
    ratio = 1.0
    for n in (small, large):
        make = codec_factory(spec or "none", error_feedback=error_feedback)
        codec, grad = make(), torch.randn(n)
        entry, bufs = encode_entry(codec, grad)
        encoded = entry_encoded(entry, list(bufs), "plan")
        enc = _timed(lambda c=codec, g=grad: encode_entry(c, g))  # type: ignore[misc]
        dec = _timed(lambda c=codec, e=encoded, n=n: c.decode(e, n, torch.float32, "cpu"))  # type: ignore[misc]
        out.append((enc, dec))
        if n == large:
            ratio = sum(b.nbytes for b in bufs) / (4 * n)
    (e1, d1), (e2, d2) = out
    e_elem, d_elem = max(0.0, (e2 - e1) / (large - small)), max(0.0, (d2 - d1) / (large - small))
    return max(0.0, e1 - e_elem * small), e_elem, max(0.0, d1 - d_elem * small), d_elem, ratio


def _apply_cost(optimizer: str) -> float:
    import torch

    from zps.protocol.optim_spec import parse_optimizer_spec
    from zps.ps.optim import build_optimizer

    n = 1 << 20
    param = torch.zeros(n)
    opt = build_optimizer(*parse_optimizer_spec(optimizer), param)
    grad = torch.randn(n)

    def step() -> None:
        param.grad = grad
        opt.step()

    return _timed(step) / n


def _message_cost() -> float:
    """A small request and reply over ZeroMQ on loopback, headers packed and parsed as zps does."""
    import zmq

    from zps.protocol.messages import Kind, Message, parse_frames

    ctx: zmq.Context = zmq.Context.instance()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.ROUTER)
    try:
        port = b.bind_to_random_port("tcp://127.0.0.1")
        a.connect(f"tcp://127.0.0.1:{port}")
        msg = Message(Kind.PUSH_PULL, id=1, src="worker:0")

        def round_trip() -> None:
            a.send_multipart(msg.to_frames())
            frames = b.recv_multipart()
            parse_frames(frames[1:])
            b.send_multipart([frames[0], *msg.to_frames()])
            parse_frames(a.recv_multipart())

        for _ in range(50):
            round_trip()
        return _timed(lambda: [round_trip() for _ in range(100)]) / 100  # type: ignore[func-returns-value]
    finally:
        a.close(0)
        b.close(0)


def calibrate(codec: str = "", pull_codec: str = "", optimizer: str = "sgd:lr=0.01", sizes: Sequence[int] = (),
              compress_min: int = 1024) -> Costs:
    """Measure this host's costs for ``codec`` (with error feedback), ``pull_codec`` and ``optimizer``; the codecs
    on the smallest and the largest of the keys ``sizes`` they would compress (a model's :func:`key_sizes`). One
    torch thread, as ``zps run`` gives each process on a host it fills (``OMP_NUM_THREADS``)."""
    import torch

    compressed = [n for n in sizes if n >= compress_min] or [4096, 1 << 20]
    large = max(compressed)
    small = min(min(compressed), max(256, large // 16))  # 16x apart at least: a line through two noisy points
    large = max(large, 16 * small)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        enc_k, enc_e, dec_k, dec_e, ratio = _codec_costs(codec, bool(codec), small, large)
        p_enc_k, p_enc_e, p_dec_k, p_dec_e, p_ratio = _codec_costs(pull_codec, False, small, large)
        return Costs(enc_k, enc_e, dec_k, dec_e, p_enc_k, p_enc_e, p_dec_k, p_dec_e, _apply_cost(optimizer),
                     _message_cost(), ratio, p_ratio)
    finally:
        torch.set_num_threads(threads)


def key_sizes(model: Model) -> list[int]:
    """The elements of each of ``model``'s keys (zps's chunks of its parameters)."""
    return [c.numel for c in make_plan([ParamSpec(f"p{i}", (n,)) for i, n in enumerate(model.sizes)], 1).chunks]


def predict(model: Model, setup: Setup, costs: Costs) -> Prediction:
    """The step time of ``model`` under ``setup`` with ``costs`` (module docstring)."""
    net = NetSpec.parse(setup.net)
    w, s = setup.workers, setup.servers
    plan = make_plan([ParamSpec(f"p{i}", (n,)) for i, n in enumerate(model.sizes)], s)
    compressed = [bool(setup.codec) and c.numel >= setup.compress_min for c in plan.chunks]
    pulled = [bool(setup.pull_codec) and c.numel >= setup.compress_min for c in plan.chunks]

    def cost(chunks: Sequence[Any], which: Sequence[bool], per_key: float, per_elem: float, base_key: float,
             base_elem: float) -> float:
        return sum((per_key + per_elem * c.numel) if z else (base_key + base_elem * c.numel)
                   for c, z in zip(chunks, which, strict=True))

    def wire(chunks: Sequence[Any], which: Sequence[bool], ratio: float) -> float:
        return sum(4 * c.numel * (ratio if z else 1.0) + 64 for c, z in zip(chunks, which, strict=True))

    copy_key, copy_elem = costs.copy_key, costs.copy_elem
    encode = cost(plan.chunks, compressed, costs.encode_key, costs.encode_elem, copy_key, copy_elem)
    decode = cost(plan.chunks, pulled, costs.pull_decode_key, costs.pull_decode_elem, copy_key, copy_elem)
    push_w = wire(plan.chunks, compressed, costs.wire_ratio)
    pull_w = wire(plan.chunks, pulled, costs.pull_wire_ratio)
    on = [[i for i, c in enumerate(plan.chunks) if c.server == r] for r in range(s)]
    push_s = [wire([plan.chunks[i] for i in ids], [compressed[i] for i in ids], costs.wire_ratio) for ids in on]
    pull_s = [wire([plan.chunks[i] for i in ids], [pulled[i] for i in ids], costs.pull_wire_ratio) for ids in on]
    server_work = []
    for ids in on:
        chunks = [plan.chunks[i] for i in ids]
        dec = cost(chunks, [compressed[i] for i in ids], costs.decode_key, costs.decode_elem, copy_key, copy_elem)
        # a compressed pull: the server encodes each worker's delta and decodes it too (its copy of what that worker
        # holds advances by exactly what the worker decodes)
        enc = cost(chunks, [pulled[i] for i in ids], costs.pull_encode_key + costs.pull_decode_key,
                   costs.pull_encode_elem + costs.pull_decode_elem, copy_key, copy_elem)
        server_work.append(w * (dec + enc) + costs.apply_elem * sum(c.numel for c in chunks) + 2 * w * costs.message)
    # the distinct links (a cluster of a thousand workers has a handful), with how many workers have each
    worker_count = Counter(net.link("worker", r) for r in range(w))
    worker_links = list(worker_count)
    links = [net.link("server", r) for r in range(s)]
    distinct_links = set(links)

    def seconds(size: float, link: Link) -> float:
        return size / link.rate if link.rate else 0.0

    def delay(a: Link, b: Link) -> float:  # one way: both links' latency and, for the slowest chunk, their jitter
        return a.latency + a.jitter + b.latency + b.jitter

    latency = max(delay(wl, sl) for wl in worker_links for sl in distinct_links)
    push_workers = max(seconds(push_w, wl) for wl in worker_links)
    pull_workers = max(seconds(pull_w, wl) for wl in worker_links)
    push_servers = max(seconds(w * b, sl) for b, sl in zip(push_s, links, strict=True))
    pull_servers = max(seconds(w * b, sl) for b, sl in zip(pull_s, links, strict=True))
    compute = model.compute
    work = list(server_work)
    if setup.local_cores:  # every process on one host: computing workers share its cores, and the servers' too
        compute *= max(1.0, w / setup.local_cores)
        work = [x * max(1.0, (s + 1) / setup.local_cores) for x in work]
    apply = max(work)

    def pipelined(ids: list[int], link: Link, loop: float) -> tuple[float, float, float]:
        """(every push in, the loop done with them, the last reply out) at one server, from the first push sent.
        A worker's keys for a server go in messages of about one chunk (:func:`~zps.protocol.plan.cut_messages`); the
        server answers a message's pulls once every worker's push of it is in and applied, while later messages still
        arrive: on a full-duplex link the replies to the first overlap the pushes of the rest."""
        groups = cut_messages([plan.chunks[i] for i in ids], lambda chunk: chunk.numel)
        elems = sum(plan.chunks[i].numel for i in ids) or 1
        total_push = sum(wire(g, [compressed[c.key] for c in g], costs.wire_ratio) for g in groups)
        pushed = looped = replied = 0.0
        first_reply = None
        sent = 0.0
        for group in groups:
            pi = wire(group, [compressed[c.key] for c in group], costs.wire_ratio)
            qi = wire(group, [pulled[c.key] for c in group], costs.pull_wire_ratio)
            sent += pi
            # in over the server's link (W workers at once), and no sooner than it left each worker's own link
            pushed = max(seconds(w * sent, link), push_workers * (sent / total_push if total_push else 1.0))
            looped = max(pushed, looped) + loop * sum(c.numel for c in group) / elems
            start = max(looped, replied)
            first_reply = start if first_reply is None else first_reply
            replied = start + seconds(w * qi, link)
        if first_reply is not None:  # and every reply into each worker's own link
            replied = max(replied, first_reply + pull_workers)
        return pushed, looped, replied

    timeline = [pipelined(ids, sl, x) for ids, sl, x in zip(on, links, work, strict=True)]
    pushed, looped, replied = max(timeline, key=lambda t: t[2])
    push = max(t[0] for t in timeline) + latency
    pull = max(0.0, replied - looped) + latency
    parts = {"compute": compute, "encode": encode, "push": push + costs.message,
             "apply": max(0.0, looped - pushed), "pull": pull, "decode": decode,
             "tables": table_seconds(model.tables, w, s, worker_links, links, latency, costs.message, costs.row)}

    def links_of(way: str, at_servers: float, at_workers: float) -> str:
        if latency > max(at_servers, at_workers):
            return f"the links' latency ({way})"
        if at_servers == at_workers:
            return f"the links ({way})"
        return f"the servers' links ({way}, incast)" if at_servers > at_workers else f"the workers' links ({way})"

    where = {"compute": "the workers' compute", "encode": "the workers' codec (encode)",
             "push": links_of("push", push_servers, push_workers), "pull": links_of("pull", pull_servers, pull_workers),
             "apply": "the servers' loops (decode + optimizer)", "decode": "the workers' codec (decode)",
             "tables": "the embedding tables' rows (pull, push, the servers' row work)"}
    if setup.mode == "bsp":
        step = sum(parts.values())
        bottleneck = where[max(parts, key=lambda k: parts[k])]
    else:  # no barrier: a worker's own path, unless the servers or their links serve the others slower

        def own_parts(wl: Link) -> dict[str, float]:  # push and pull overlap key by key on a full-duplex link
            push_t, pull_t, d = seconds(push_w, wl), seconds(pull_w, wl), max(delay(wl, sl) for sl in distinct_links)
            return {"compute": compute, "encode": encode, "push": push_t + d + costs.message, "apply": apply / w,
                    "pull": max(0.0, pull_t - push_t) + d, "decode": decode,
                    "tables": table_seconds(model.tables, w, s, [wl], links, d, costs.message, costs.row)}

        owns = sorted(((own_parts(wl), worker_count[wl]) for wl in worker_links), key=lambda o: sum(o[0].values()))
        own = w / sum(n / sum(o.values()) for o, n in owns)  # the workers' mean rate: each goes at its own pace
        ranked = [o for o, n in owns for _ in range(n)] if len(owns) > 1 else [owns[0][0]]
        parts = ranked[len(ranked) // 2]  # the median worker's
        shared_links = max(seconds(w * (a + b), sl) for a, b, sl in zip(push_s, pull_s, links, strict=True))
        shared = max(apply, shared_links)
        step = max(own, shared)
        if shared > own:  # the workers wait for the servers: their share of it shows as apply
            parts = {**parts, "apply": parts["apply"] + shared - own}
            bottleneck = where["apply"] if apply >= shared_links else "the servers' links (every worker's traffic)"
        else:
            bottleneck = where[max(parts, key=lambda k: parts[k])]
    servers_busy = max(apply, push_servers, pull_servers)
    workers_busy = compute + encode + decode + max(push_workers, pull_workers)
    return Prediction(step, parts, bottleneck, servers_busy, workers_busy)


def suggestions(model: Model, setup: Setup, costs: Costs, topk: Costs) -> list[tuple[str, float]]:
    """What would move the step: (change, predicted step time)."""
    out = [(f"{setup.servers * 2} servers", predict(model, replace(setup, servers=setup.servers * 2), costs).step)]
    if not setup.codec:
        out.append(("--codec topk:ratio=0.01 --error-feedback --pull-codec int8",
                    predict(model, replace(setup, codec="topk:ratio=0.01", pull_codec="int8"), topk).step))
    if setup.mode == "bsp":
        out.append(("--mode ssp", predict(model, replace(setup, mode="ssp"), costs).step))
    return out


WITHIN = 0.10  # servers needed: within this fraction of the fastest step


@dataclass(frozen=True)
class Need:
    """How many servers a configuration needs (:func:`servers_needed`)."""

    servers: int  # the fewest whose step is within ``within`` of the fastest
    step: float  # the predicted step at ``servers``
    best_servers: int  # the count with the fastest step (the fewest, on a tie)
    best: float
    within: float
    most: int  # the counts tried: 1 .. most

    def definition(self) -> str:
        return (f"servers needed: the fewest servers whose predicted step is within {self.within:.0%} of the fastest "
                f"over 1 to {self.most} servers (past the model's keys a server holds one key: more servers change "
                "nothing)")


def server_counts(model: Model, setup: Setup, costs: Costs, most: int = 1024) -> list[Prediction]:
    """The predictions of ``setup`` with 1, 2, ... servers, up to ``most`` or the model's keys (zps's chunks of its
    tensors, at most 4 MiB each): past that a server holds one key, and more servers change nothing."""
    keys = len(key_sizes(model))
    return [predict(model, replace(setup, servers=s), costs) for s in range(1, min(most, keys) + 1)]


def servers_needed(model: Model, setup: Setup, costs: Costs, within: float = WITHIN, most: int = 1024,
                   tried: Sequence[Prediction] | None = None) -> Need:
    """The fewest servers whose predicted step is within ``within`` (0.10: 10%) of the fastest over 1 .. ``most``
    servers (:func:`server_counts`, or ``tried``: its result)."""
    tried = list(tried) if tried is not None else server_counts(model, setup, costs, most)
    best = min(range(len(tried)), key=lambda i: tried[i].step)
    s = next(i for i, p in enumerate(tried, 1) if p.step <= tried[best].step * (1 + within))
    return Need(s, tried[s - 1].step, best + 1, tried[best].step, within, len(tried))


def parse_counts(values: Sequence[str]) -> list[int]:
    """``["64,128", "256"]`` -> [64, 128, 256]; ``"64..1024"`` doubles from 64 to 1024."""
    out: list[int] = []
    for part in (p.strip() for v in values for p in v.split(",")):
        first, dots, last = part.partition("..")
        if dots:
            n, end = int(first), int(last)
            if n < 1 or end < n:
                raise ValueError(f"{part!r}: expected A..B with 1 <= A <= B")
            while n <= end:
                out.append(n)
                n *= 2
        elif part:
            out.append(int(part))
    if not out or min(out) < 1:
        raise ValueError(f"{' '.join(values)!r}: expected counts >= 1 (e.g. 64,128,256 or 64..1024)")
    return out
