"""``zps plan``'s verdict: parameter servers (zps), ring all-reduce (DDP) or BytePS's mix of both, for one model and
cluster, from the same calibrated costs (:mod:`.planner`).

Every architecture is predicted for a synchronous step with the same compute and without overlapping communication
with backward (the planner's own assumptions). ``M`` is the gradient's bytes (float32; fp16/bf16 codecs halve it:
they are the codecs a ring can sum; sparsifying and quantising codecs do not compose with its reduction, so the
ring and BytePS are predicted dense), ``W`` the workers, ``B_w`` the slowest worker's link rate each way, ``B_s``
the slowest server's, ``alpha`` one hop between two workers: both links' latency and jitter (the collective
library's own cost per hop, microseconds in NCCL's C++, is left out; zps's per-message cost, measured here in Python,
is in its own prediction). The formulas:

- **parameter servers (zps)**: :func:`~zps.lab.planner.predict` (push, the servers' loops, pull, with incast at each
  server's link and zps's own sharding), with S servers as given, and with the servers needed.
- **ring all-reduce** (Patarasuk and Yuan 2009; what DDP runs over NCCL or gloo, in buckets of 25 MiB):
  ``compute + 2 (W - 1) / W x M / B_w + 2 (W - 1) x buckets x alpha + the sums + the optimizer on every worker``.
  Each worker sends and receives ``2 (W - 1) / W x M``: the bandwidth term stays under ``2 M / B_w`` at any W, while
  a parameter server's link carries ``W x M / S``. The latency term grows with W: at scale NCCL switches to trees
  (``2 log2 W`` hops), which this model leaves out, so at a thousand workers it overstates the ring's latency.
- **BytePS** (Jiang et al., OSDI 2020) with ``k`` = S CPU machines running only the summation: a share ``x`` of the
  gradient is summed on them (push and pull, as to a parameter server), the rest all-reduced among the workers. A
  worker's link carries ``(x + a (1 - x)) M`` each way, ``a = 2 (W - 1) / W``; a summation machine's
  ``W x M / k``. The best share makes the two equal:
  ``x = (a / B_w) / (W / (k B_s) + (a - 1) / B_w)`` (clipped to [0, 1]), and the time is ``W x M / (k B_s)``. With
  equal links (``B_w = B_s = B``) that is the paper's ``2 W (W - 1) M / ((W^2 + k W - 2 k) B)``: ``k = 0`` is the
  ring, ``k = W`` a parameter server with as many servers as workers (``M / B``). The optimizer runs on every
  worker; latency: the larger of a round trip to the servers and the ring's hops.

**Embedding tables** (``--table IDS:DIM:ROWS``, docs/embeddings.md). zps pulls and pushes a batch's distinct rows
(:func:`~zps.lab.table_plan.table_seconds`); under all-reduce a table is an ``nn.Embedding`` every worker holds
whole:

- the **ring** and **BytePS** take it dense (``nn.Embedding``'s default, and what BytePS reduces): its whole
  gradient, ``4 x ROWS x DIM`` bytes, joins ``M`` every step, and the optimizer steps all of its rows on every
  worker;
- **DDP, sparse rows** (``nn.Embedding(sparse=True)`` under DDP over gloo, which all-gathers a sparse gradient's
  indices and values): the dense parameters are all-reduced as by the ring, and each worker receives every other
  worker's distinct rows, ``(W - 1) x IDS x (8 + 4 DIM)`` bytes per table over ``3 (W - 1)`` hops (sizes, indices,
  values); its optimizer steps the union of the rows (at most ``min(ROWS, W x IDS)``) on every worker.

A table whose ROWS is not given is left out of the ring's and BytePS's ``M`` (:func:`tables_left_out`). **Memory**:
a worker holds at least the float32 values and gradients of what it trains (optimizer state comes on top): zps's,
the dense parameters and its batch's rows; the ring's and BytePS's, the dense parameters and every table whole
with its dense gradient (``8 x ROWS x DIM``); sparse DDP's, every table whole (``4 x ROWS x DIM``) and the rows
gathered. With a worker's memory stated (``Setup.worker_memory``), an architecture needing more cannot train the
model at all: it is named as such and never the verdict.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from zps.protocol.simulation import Link, NetSpec

from .planner import Costs, Model, Need, Prediction, Setup, predict, server_counts, servers_needed
from .table_plan import rows_of

DDP_BUCKET = 25 * 1024 * 1024  # bytes: DistributedDataParallel's bucket_cap_mb default
SUMMABLE = {"fp16": 0.5, "bf16": 0.5}  # codecs a ring can sum, and their size against float32
TIE = 0.05  # predictions this close are called a tie
RING = "ring"  # the ring all-reduce's name in a verdict
SPARSE = "DDP, sparse rows"  # DDP with nn.Embedding(sparse=True): the tables' rows all-gathered


@dataclass(frozen=True)
class Candidate:
    """One architecture's predicted step: its total and its parts (seconds)."""

    name: str
    step: float
    parts: dict[str, float]
    memory: float = 0.0  # bytes a worker holds at least (float32 values and gradients; optimizer state on top)
    fits: bool = True  # False: more than the worker memory stated (this architecture cannot train the model)


def _rates(setup: Setup) -> tuple[float | None, float | None, float]:
    """(the slowest worker link's rate, the slowest server link's rate, one hop between two workers)."""
    net = NetSpec.parse(setup.net)
    workers = {net.link("worker", r) for r in range(setup.workers)}
    servers = {net.link("server", r) for r in range(setup.servers)}

    def slowest(links: set[Link]) -> float | None:  # None: every link unlimited
        rates = [link.rate for link in links if link.rate]
        return min(rates) if rates else None

    hop = 2 * max(link.latency + link.jitter for link in workers)
    return slowest(workers), slowest(servers), hop


def gib(size: float) -> str:
    """Bytes as GiB, for people: ``"7.6"``, ``"0.004"``."""
    value = size / 2**30
    return f"{value:,.1f}" if value >= 0.95 else f"{value:.2g}"


def table_elements(model: Model) -> int:
    """ROWS x DIM summed over the tables whose ROWS is given: what all-reduce holds and reduces of them."""
    return sum(rows * t[1] for t in model.tables if (rows := rows_of(t)) is not None)


def tables_left_out(model: Model) -> bool:
    """Some table has no ROWS: the ring and BytePS are predicted without it."""
    return any(rows_of(t) is None for t in model.tables)


def gradient_bytes(model: Model, setup: Setup) -> float:
    """M: what a dense reduction moves (float32, or the size of a summable codec's values): the dense parameters'
    gradient and every table's whole (its ROWS given), as an ``nn.Embedding``'s dense gradient."""
    return 4.0 * (sum(model.sizes) + table_elements(model)) * SUMMABLE.get(setup.codec.split(":")[0], 1.0)


def worker_memory(model: Model, setup: Setup, way: str) -> float:
    """Bytes a worker holds at least under ``way`` (``"zps"``, ``"dense"``: the ring and BytePS, ``"sparse"``):
    float32 values and gradients (module docstring)."""
    dense = 8.0 * sum(model.sizes)
    if way == "zps":
        return dense + sum(8.0 * t[0] * t[1] for t in model.tables)
    if way == "sparse":
        return dense + 4.0 * table_elements(model) + setup.workers * sum(t[0] * (8 + 4 * t[1]) for t in model.tables)
    return dense + 8.0 * table_elements(model)


def _held(candidate: Candidate, model: Model, setup: Setup, way: str) -> Candidate:
    need = worker_memory(model, setup, way)
    return replace(candidate, memory=need, fits=not setup.worker_memory or need <= setup.worker_memory)


def _compute(model: Model, setup: Setup) -> float:
    return model.compute * (max(1.0, setup.workers / setup.local_cores) if setup.local_cores else 1.0)


def ring_allreduce(model: Model, setup: Setup, costs: Costs) -> Candidate:
    """The ring all-reduce step (module docstring)."""
    w = setup.workers
    rate, _, hop = _rates(setup)
    m = gradient_bytes(model, setup)
    params = sum(model.sizes) + table_elements(model)
    buckets = max(1, math.ceil(m / DDP_BUCKET))
    share = 2 * (w - 1) / w
    parts = {"compute": _compute(model, setup),
             "transfer": share * m / rate if rate else 0.0,
             "latency": 2 * (w - 1) * buckets * hop if w > 1 else 0.0,
             "sum": (w - 1) / w * params * costs.copy_elem,
             "optimizer": params * costs.apply_elem}
    return _held(Candidate(RING, sum(parts.values()), parts), model, setup, "dense")


def ddp_sparse(model: Model, setup: Setup, costs: Costs) -> Candidate:
    """DDP with the tables as ``nn.Embedding(sparse=True)``: the dense parameters all-reduced by the ring, every
    worker's distinct rows all-gathered (module docstring)."""
    w = setup.workers
    rate, _, hop = _rates(setup)
    parts = dict(ring_allreduce(replace(model, tables=()), setup, costs).parts)
    gathered = (w - 1) * sum(t[0] * (8 + 4 * t[1]) for t in model.tables)
    union = sum(min(w * t[0], rows_of(t) or w * t[0]) * t[1] for t in model.tables)
    parts["transfer"] += gathered / rate if rate else 0.0
    parts["latency"] += 3 * (w - 1) * hop * len(model.tables) if w > 1 else 0.0
    parts["sum"] += w * sum(t[0] * t[1] for t in model.tables) * costs.copy_elem
    parts["optimizer"] += union * costs.apply_elem
    return _held(Candidate(SPARSE, sum(parts.values()), parts), model, setup, "sparse")


def byteps_share(w: int, k: int, worker_rate: float | None, server_rate: float | None) -> float:
    """The share x of the gradient BytePS sums on its k CPU machines (module docstring); 0 without any."""
    if k <= 0 or w <= 1:
        return 0.0
    if not worker_rate or not server_rate:
        return 1.0 if not server_rate else 0.0  # the unlimited links take it all
    a = 2 * (w - 1) / w
    x = (a / worker_rate) / (w / (k * server_rate) + (a - 1) / worker_rate)
    return min(1.0, max(0.0, x))


def byteps(model: Model, setup: Setup, costs: Costs) -> Candidate:
    """BytePS with k = ``setup.servers`` summation machines (module docstring)."""
    w, k = setup.workers, setup.servers
    worker_rate, server_rate, hop = _rates(setup)
    m = gradient_bytes(model, setup)
    params = sum(model.sizes) + table_elements(model)
    x = byteps_share(w, k, worker_rate, server_rate)
    a = 2 * (w - 1) / w
    at_worker = (x + a * (1 - x)) * m / worker_rate if worker_rate else 0.0
    at_server = w * x * m / (k * server_rate) if server_rate and k else 0.0
    buckets = max(1, math.ceil((1 - x) * m / DDP_BUCKET))
    ring_latency = 2 * (w - 1) * buckets * hop if x < 1 and w > 1 else 0.0
    server_latency = 2 * hop if x > 0 else 0.0
    parts = {"compute": _compute(model, setup),
             "transfer": max(at_worker, at_server),
             "latency": max(ring_latency, server_latency),
             "sum": (w * x * params / k if k else (w - 1) / w * params) * costs.copy_elem,
             "optimizer": params * costs.apply_elem}
    return _held(Candidate(f"BytePS (k={k})", sum(parts.values()), parts), model, setup, "dense")


@dataclass(frozen=True)
class Verdict:
    """The architectures for one (W, S), fastest first."""

    setup: Setup
    ps: Prediction  # zps with S servers
    need: Need  # zps's servers needed
    candidates: list[Candidate]  # zps (S), zps (servers needed), the ring, BytePS: by step
    matches_ring: int | None  # the fewest servers with which zps is no slower than the ring (None: none up to
    # the model's keys)

    @property
    def fastest(self) -> Candidate:
        """The fastest of those that fit in a worker's memory (candidates are ordered so)."""
        return self.candidates[0]

    @property
    def unfit(self) -> list[Candidate]:
        """The architectures a worker's memory cannot hold (they cannot train the model at all)."""
        return [c for c in self.candidates if not c.fits]

    def winners(self, tie: float = TIE) -> list[Candidate]:
        """The fastest and every other within ``tie`` of it (a prediction is not that precise), of those that fit."""
        return [c for c in self.candidates if c.fits and c.step <= self.fastest.step * (1 + tie)]

    def says(self) -> str:
        """The verdict in words: the fastest and by how much, or the architectures that tie; and those that cannot
        hold the model in the worker memory stated."""
        won = self.winners()
        fit = [c for c in self.candidates if c.fits]
        if not won:
            out = "none fits"
        elif len(won) > 1:
            out = "about equal: " + ", ".join(c.name for c in won)
        elif len(fit) > 1:
            out = f"{won[0].name}, {fit[1].step / won[0].step:.2f}x {fit[1].name}"
        else:
            out = f"{won[0].name}, the only one that fits"
        if self.unfit:
            least, stated = min(c.memory for c in self.unfit), self.setup.worker_memory
            out += (f"; out of memory: {', '.join(c.name for c in self.unfit)} (a worker would hold at least "
                    f"{gib(least)} GiB, over the {gib(stated)} GiB stated)")
        return out


def verdict(model: Model, setup: Setup, costs: Costs, within: float,
            tried: Sequence[Prediction] | None = None) -> Verdict:
    """zps with ``setup.servers`` servers and with the servers it needs, the ring and BytePS (k = S), by step.
    ``tried``: :func:`~zps.lab.planner.server_counts` of ``setup`` where already computed."""
    tried = list(tried) if tried is not None else server_counts(model, setup, costs)
    need = servers_needed(model, setup, costs, within, tried=tried)
    ps = predict(model, setup, costs)
    ring = ring_allreduce(model, setup, costs)
    candidates = [_held(Candidate(f"zps (S={setup.servers})", ps.step, ps.parts), model, setup, "zps"),
                  _held(Candidate(f"zps (S={need.servers})", need.step, tried[need.servers - 1].parts), model, setup,
                        "zps"),
                  ring, byteps(model, setup, costs)]
    if need.servers == setup.servers:
        candidates.pop(1)
    if model.tables:
        candidates.append(ddp_sparse(model, setup, costs))
    matches = next((s for s, p in enumerate(tried, 1) if p.step <= ring.step), None)
    return Verdict(setup, ps, need, sorted(candidates, key=lambda c: (not c.fits, c.step)), matches)


def byteps_equal_links(w: int, k: int, m: float, rate: float) -> float:
    """The paper's closed form with equal links: 2 W (W - 1) M / ((W^2 + k W - 2 k) B) seconds."""
    return 2 * w * (w - 1) * m / ((w * w + k * w - 2 * k) * rate)
