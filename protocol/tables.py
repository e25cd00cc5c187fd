"""Embedding tables on the wire: what a table is (:class:`TableSpec`), which server holds a row (:func:`server_of`),
a row's value before its first update (:func:`initial_rows`), rows as frames (the row codecs) and the checked
readers of the table messages.

A table is held by row, never whole: the row of id ``i`` (any int64) lives on server
``mix64(i ^ SERVER_SALT) % num_servers`` (:func:`server_of`: a fixed 64-bit mixer, the same on every process, so
adding servers adds capacity and a checkpoint re-spreads onto any number of them). A row that was never updated
reads as its initial value, which depends only on (table name, id, seed) (:func:`initial_rows`), so a replay or a
resume is exact and a row need not be stored before it is trained.

Messages (the per-key fields are :class:`zps.protocol.messages.KeyEntry`'s; ``key`` is the table's key,
:func:`table_key`, the CRC-32 of its name):

- ``TABLE`` (worker -> every server): declare a table; the body is :meth:`TableSpec.to_body` (read by
  :func:`read_table`). Every worker sends the same; a table declared otherwise is refused (CONFLICT). The OK
  reply's body holds ``step``: the step the table is at (0, or a resumed job's).
- ``ROWS_PULL`` (worker -> a server): one entry per table, ``{"key", "step", "numel": n, "nf": 1}`` and a frame
  of ``n`` distinct int64 ids (little-endian) the server holds; ``pc``: the row codec of the answer. ``step``
  says which values: BSP waits until the table applied ``step`` steps. The OK reply has one entry per table,
  ``{"key", "numel": n, "version", "codec", "nf"}`` and the rows' frames (:func:`encode_rows`), in the order
  asked.
- ``ROWS_PUSH`` (worker -> every server, every step, ids or none): one entry per table,
  ``{"key", "step", "numel": n, "codec", "nf"}``, the ids frame then the gradient rows' frames; ``hp``: the
  table optimizer's hyper-parameters for this step (``{"lr": ...}``). A push of (worker, table, step) is applied
  once (a retry is acknowledged and not applied again).

``--replicas R``: the rows of home ``h`` (the ids ``server_of`` gives ``h``) live on the copies
:func:`zps.protocol.replicas.live_copies` names. ROWS_PULL and ROWS_PUSH entries name their ``home``, and a
worker sends them to the live primary of that home (every home is pushed every step, wherever it is served);
the primary forwards each update to the home's backups:

- ``TABLE_REPLICATE`` (primary -> backup, one per update): one entry ``{"key", "home", "version", "step",
  "numel": n, "nf"}`` (``worker``: ASP/SSP, the push it came from; ``hp``: ``{"lr": ...}`` as the primary applied
  it; ``sightings``: a third frame follows) and the frames: the ``n`` ids, their float32 gradient rows (and the
  int64 sightings), exactly what the primary gave :meth:`zps.protocol.rowstore.RowStore.apply`.
- ``TABLE_SEED`` (primary -> a backup new to a home, after a failover): the home's whole partition in ``parts``
  messages, each checked whole; the body is :class:`TableSeedBody` (read by :func:`read_seed_body`), the one
  entry ``{"key", "home", "numel": rows of this part, "nf"}``, the frames the rows' ids (ascending), float32
  values, int32 steps last updated, each optimizer state tensor (:func:`zps.protocol.rowstore.state_names`) and,
  where ``sketch`` says, a slice of the admission sketch (int32).
"""
from __future__ import annotations

import math
import re
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np
import torch

from . import replicas
from .fields import MAX_INT, UNBOUNDED, is_int, is_number
from .messages import ErrorCode, KeyEntry, ProtocolError
from .replicas import FailoverNotice

SERVER_SALT = 0x5A505354424C4531  # "ZPSTBLE1": the row -> server rule's salt (never change it: checkpoints use it)
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
MAX_DIM = 1 << 16  # elements of one row
MAX_TABLE_STEP = (1 << 31) - 1  # a table's steps: each row keeps the step it was last updated at as an int32
MAX_NAME = 200
ROW_CODECS = ("none", "fp16", "int8")
# The row-wise optimizers the servers apply to touched rows only: their hyper-parameters and defaults.
ROW_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.01},
    "adagrad": {"lr": 0.01, "eps": 1e-10, "initial_accumulator_value": 0.0, "lr_decay": 0.0},
    "rowwise_adagrad": {"lr": 0.01, "eps": 1e-10, "initial_accumulator_value": 0.0},
    "sparse_adam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8},
}
_ALIASES = {"adam": "sparse_adam", "sparseadam": "sparse_adam", "rowwise-adagrad": "rowwise_adagrad",
            "rowwiseadagrad": "rowwise_adagrad"}
INITS = ("uniform", "normal", "zeros")
SYNCS = ("", "async")


def table_key(name: str) -> int:
    """The ``key`` of table ``name`` in table messages (two names with one key are refused at declaration)."""
    return zlib.crc32(name.encode())


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 values (wrapping arithmetic): a fixed, well-mixed hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _as_u64(ids: torch.Tensor) -> np.ndarray:
    return ids.detach().to("cpu", torch.int64).contiguous().numpy().view(np.uint64)


def server_of(ids: torch.Tensor, num_servers: int) -> torch.Tensor:
    """The server of each id (int64 tensor, any shape): ``mix64(id ^ SERVER_SALT) % num_servers``."""
    hashed = mix64(_as_u64(ids) ^ np.uint64(SERVER_SALT))
    return torch.from_numpy((hashed % np.uint64(num_servers)).astype(np.int64)).view(ids.shape)


def _uniform01(ids: np.ndarray, dim: int, salt: int, stream: int) -> np.ndarray:
    """(n, dim) float64 in [0, 1): element j of id i from ``mix64(mix64(i ^ salt) + (j * 2 + stream) * GOLDEN)``."""
    base = mix64(ids ^ np.uint64(salt))[:, None]
    counters = (np.arange(dim, dtype=np.uint64) * np.uint64(2) + np.uint64(stream)) * _GOLDEN
    bits = mix64(base + counters[None, :]) >> np.uint64(11)  # 53 bits
    return bits.astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class TableSpec:
    """One table, as every process of a job agrees on it.

    ``optimizer``: a row-wise optimizer (:data:`ROW_OPTIMIZERS`) and ``hp`` its hyper-parameters (defaults filled
    in); ``init``: ``uniform`` (U(-scale, scale), scale 1/sqrt(dim) by default), ``normal`` (N(0, scale^2), scale 1
    by default, as nn.Embedding) or ``zeros``; ``seed``: with the name, decides every initial value; ``admit``: a
    row is stored from its ``admit``-th sighting (a worker's gradient row; before that it reads as its initial
    value and its gradients are dropped); ``expire``: a row not updated for that many steps is evicted (0: never);
    ``max_rows``: rows one server holds, never exceeded (0: no cap; the rows least recently updated are evicted to
    make room); ``sync``: ``"async"`` applies this table's pushes as they come whatever the job's mode (the hybrid:
    tables asynchronous, dense parameters synchronous); ``codec``: how rows and gradient rows cross the wire."""

    name: str
    dim: int
    optimizer: str = "sgd"
    hp: dict[str, Any] = field(default_factory=dict)
    init: str = "uniform"
    scale: float | None = None
    seed: int = 0
    admit: int = 1
    expire: int = 0
    max_rows: int = 0
    sync: str = ""
    codec: str = "none"

    def __post_init__(self) -> None:
        problem = _spec_problem(self)
        if problem:
            raise ValueError(f"table {self.name!r}: {problem}")
        object.__setattr__(self, "hp", {**ROW_OPTIMIZERS[self.optimizer], **self.hp})

    @property
    def key(self) -> int:
        return table_key(self.name)

    @property
    def init_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        return 1.0 / math.sqrt(self.dim) if self.init == "uniform" else 1.0

    def to_body(self) -> dict[str, Any]:
        hp = {k: list(v) if isinstance(v, tuple) else v for k, v in self.hp.items()}
        return {"name": self.name, "dim": self.dim, "optimizer": self.optimizer, "hp": hp, "init": self.init,
                "scale": self.scale, "seed": self.seed, "admit": self.admit, "expire": self.expire,
                "max_rows": self.max_rows, "sync": self.sync, "codec": self.codec}

    def same(self, other: TableSpec) -> bool:
        return self.to_body() == other.to_body()


def _spec_problem(s: TableSpec) -> str:
    if not isinstance(s.name, str) or not 0 < len(s.name) <= MAX_NAME:
        return f"the name must be 1 to {MAX_NAME} characters"
    if not is_int(s.dim, 1, MAX_DIM + 1):
        return f"dim must be an integer in [1, {MAX_DIM}], got {s.dim!r}"
    if s.optimizer not in ROW_OPTIMIZERS:
        return f"optimizer {s.optimizer!r} is not one of {', '.join(ROW_OPTIMIZERS)}"
    known = ROW_OPTIMIZERS[s.optimizer]
    if not isinstance(s.hp, dict):
        return "hp must be a map"
    for name, value in s.hp.items():
        if name not in known:
            return f"{s.optimizer} takes no hyper-parameter {name!r} (it takes {', '.join(known)})"
        if name == "betas":
            if not (isinstance(value, (list, tuple)) and len(value) == 2
                    and all(is_number(b, 0.0, 1.0) and b < 1.0 for b in value)):
                return f"betas must be two numbers in [0, 1), got {value!r}"
        elif not is_number(value, 0.0, 3.0e38):
            return f"{name} must be a non-negative finite number, got {value!r}"
    if s.init not in INITS:
        return f"init {s.init!r} is not one of {', '.join(INITS)}"
    if s.scale is not None and not is_number(s.scale, 0.0, 1.0e6):
        return f"the init scale must be a number in [0, 1e6], got {s.scale!r}"
    if not is_int(s.seed, 0, 1 << 63):
        return f"seed must be a non-negative 63-bit integer, got {s.seed!r}"
    if not is_int(s.admit, 1, MAX_INT):
        return f"admit must be an integer >= 1, got {s.admit!r}"
    if not is_int(s.expire, 0, MAX_INT):
        return f"expire must be an integer >= 0 (steps; 0: never), got {s.expire!r}"
    if not is_int(s.max_rows, 0, MAX_INT):
        return f"max_rows must be an integer >= 0 (0: no cap), got {s.max_rows!r}"
    if s.sync not in SYNCS:
        return f"sync must be '' (the job's mode) or 'async', got {s.sync!r}"
    if s.codec not in ROW_CODECS:
        return f"codec {s.codec!r} is not one of {', '.join(ROW_CODECS)}"
    return ""


_SPEC = re.compile(r"^([A-Za-z_-]+)(?::(.*))?$")


def parse_optimizer(spec: str) -> tuple[str, dict[str, Any]]:
    """``"adagrad:lr=0.05,eps=1e-8"`` -> ``("adagrad", {"lr": 0.05, "eps": 1e-8})`` (names as
    :data:`ROW_OPTIMIZERS`; ``adam`` is ``sparse_adam``); ValueError naming what is wrong."""
    found = _SPEC.match(spec.strip())
    if found is None:
        raise ValueError(f"table optimizer {spec!r}: expected NAME or NAME:key=value,...")
    name = found.group(1).lower()
    name = _ALIASES.get(name, name)
    if name not in ROW_OPTIMIZERS:
        raise ValueError(f"table optimizer {spec!r}: {name!r} is not one of {', '.join(ROW_OPTIMIZERS)}")
    hp: dict[str, Any] = {}
    for item in filter(None, re.split(r",(?![^()]*\))", found.group(2) or "")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"table optimizer {spec!r}: {item!r} is not key=value")
        text = value.strip()
        try:
            hp[key.strip()] = (tuple(float(v) for v in text.strip("()").split(",")) if text.startswith("(")
                               else float(text))
        except ValueError:
            raise ValueError(f"table optimizer {spec!r}: {key.strip()}={text!r} is not a number") from None
    return name, hp


def read_table(body: dict[str, Any]) -> TableSpec:
    """A TABLE body, checked (BAD_HEADER naming the field)."""
    fields = ("name", "dim", "optimizer", "hp", "init", "scale", "seed", "admit", "expire", "max_rows", "sync",
              "codec")
    if not isinstance(body, dict) or set(body) - set(fields) or "name" not in body or "dim" not in body:
        raise ProtocolError(ErrorCode.BAD_HEADER, f"a table body has the fields {', '.join(fields)} (name and dim "
                                                  "at least)")
    hp = body.get("hp", {})
    if isinstance(hp, dict) and isinstance(hp.get("betas"), list):
        hp = {**hp, "betas": tuple(hp["betas"])}
    try:
        return TableSpec(**{**body, "hp": hp})
    except (ValueError, TypeError) as exc:
        raise ProtocolError(ErrorCode.BAD_HEADER, str(exc)[:300]) from None


def initial_rows(spec: TableSpec, ids: torch.Tensor) -> torch.Tensor:
    """The (n, dim) float32 values of rows ``ids`` before their first update: a function of (name, id, seed) only."""
    n = ids.numel()
    if spec.init == "zeros" or n == 0:
        return torch.zeros(n, spec.dim, dtype=torch.float32)
    u64 = _as_u64(ids.reshape(-1))
    salt = (spec.key << 32) ^ (spec.seed * 0x2545F4914F6CDD1D % (1 << 64))
    if spec.init == "uniform":
        values = (_uniform01(u64, spec.dim, salt, 0) * 2.0 - 1.0) * spec.init_scale
    else:  # normal: Box-Muller
        u1 = 1.0 - _uniform01(u64, spec.dim, salt, 0)  # (0, 1]
        u2 = _uniform01(u64, spec.dim, salt, 1)
        values = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2) * spec.init_scale
    return torch.from_numpy(values.astype(np.float32))


# -- rows as frames ------------------------------------------------------------------------------------------------
def encode_rows(rows: torch.Tensor, codec: str) -> tuple[list[Any], int]:
    """(n, dim) float32 rows as frames with ``codec``: ``none`` one float32 frame; ``fp16`` one float16 frame;
    ``int8`` an int8 frame and a float32 frame of per-row scales (absmax / 127). Returns the frames and their
    bytes."""
    rows = rows.detach().to("cpu", torch.float32).contiguous()
    if codec == "none":
        frames = [rows]
    elif codec == "fp16":
        frames = [rows.to(torch.float16)]
    elif codec == "int8":
        scale = rows.abs().amax(dim=1) / 127.0 if rows.numel() else torch.zeros(rows.shape[0])
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        frames = [torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8), scale.to(torch.float32)]
    else:
        raise ValueError(f"row codec {codec!r} is not one of {', '.join(ROW_CODECS)}")
    out = [f.numpy().data.cast("B") if f.numel() else b"" for f in frames]
    return out, sum(f.numel() * f.element_size() for f in frames)


def frames_of(codec: str) -> int:
    return 2 if codec == "int8" else 1


_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int8: np.int8, torch.int64: np.int64}
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def _view(frame: Any, dtype: torch.dtype, numel: int, what: str) -> torch.Tensor:
    view = memoryview(frame.buffer if hasattr(frame, "buffer") else frame).cast("B")
    size = torch.empty((), dtype=dtype).element_size()
    if view.nbytes != numel * size:
        raise ProtocolError(ErrorCode.FRAME_SIZE, f"{what}: a frame of {view.nbytes} bytes, expected {numel} x {size}")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(np.frombuffer(view, dtype=_NUMPY[dtype]))


def decode_rows(frames: list[Any], codec: str, n: int, dim: int, what: str, copy: bool = True) -> torch.Tensor:
    """(n, dim) float32 rows from :func:`encode_rows`' frames (checked: sizes, finite values); a new tensor, or with
    ``copy=False`` and codec ``none`` a view of the frame (read it before the frame goes; never write it)."""
    if codec not in ROW_CODECS:
        raise ProtocolError(ErrorCode.BAD_CODEC, f"{what}: row codec {str(codec)[:40]!r} is not one of "
                                                 f"{', '.join(ROW_CODECS)}")
    if len(frames) != frames_of(codec):
        raise ProtocolError(ErrorCode.FRAME_COUNT, f"{what}: {len(frames)} frames for codec {codec}")
    if codec == "none":
        rows = _view(frames[0], torch.float32, n * dim, what)
        rows = rows.clone() if copy else rows
    elif codec == "fp16":
        rows = _view(frames[0], torch.float16, n * dim, what).to(torch.float32)
    else:
        q = _view(frames[0], torch.int8, n * dim, what).view(n, dim)
        scale = _view(frames[1], torch.float32, n, what)
        rows = q.to(torch.float32) * scale[:, None]
    rows = rows.view(n, dim)
    if n and not bool(np.isfinite(rows.numpy()).all()):  # (numpy's: vectorised, ~30x torch.isfinite's speed here)
        raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: rows that are not finite")
    return rows


def read_ids(frame: Any, n: int, what: str) -> torch.Tensor:
    """A frame of ``n`` distinct int64 ids (a copy)."""
    ids = _view(frame, torch.int64, n, what).clone()
    if n > 1:
        ordered = np.sort(ids.numpy())  # (a sort and a comparison: a fraction of torch.unique's time)
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: an id appears twice (a worker sends each id once)")
    return ids


def ids_frame(ids: torch.Tensor) -> Any:
    ids = ids.detach().to("cpu", torch.int64).contiguous()
    return ids.numpy().data.cast("B") if ids.numel() else b""


def row_entry(key: int, step: int, n: int, **fields: Any) -> KeyEntry:
    entry: KeyEntry = {"key": key, "step": step, "numel": n}
    entry.update(fields)  # type: ignore[typeddict-item]
    return entry


def read_count(entry: KeyEntry, most: int, what: str) -> int:
    """An entry's ``numel``: how many ids (at most ``most``)."""
    n = entry.get("numel")
    if not is_int(n, 0, most + 1):
        raise ProtocolError(ErrorCode.TOO_LARGE if is_int(n) else ErrorCode.BAD_HEADER,
                            f"{what}: 'numel' (ids) must be an integer in [0, {most}], got {str(n)[:40]}")
    return n


def read_lr(value: Any, what: str) -> dict[str, float] | None:
    """A push's ``hp``: None, or ``{"lr": finite number >= 0}``."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"lr"} or not is_number(value.get("lr"), 0.0, 3.0e38):
        raise ProtocolError(ErrorCode.BAD_OPTIMIZER, f"{what}: 'hp' of a table push is {{'lr': number >= 0}}")
    return {"lr": float(value["lr"])}


# -- --replicas: a partition's seed --------------------------------------------------------------------------------
MAX_SEED_PARTS = 1 << 20


class TableSeedBody(TypedDict):
    """The body of a TABLE_SEED request (``--replicas``, a primary to a backup): one part of a home's partition of a
    table. Every part carries the partition's scalars; the backup takes the partition once the last part came.

    - ``table``: the table (:meth:`TableSpec.to_body`): a backup new to it declares it so
    - ``failover``: the topology the primary seeds for (:class:`zps.protocol.replicas.FailoverNotice`)
    - ``part``, ``parts``: this is part ``part`` of ``parts`` (0-based, sent in order)
    - ``rows``: the partition's rows in all (the parts' ``numel`` add up to it)
    - ``version``: the updates the partition applied; ``steps``, ``clock``: its store's optimizer step count and
      newest step (:class:`zps.protocol.rowstore.RowStore`)
    - ``last``: ``[[worker, step], ...]``, each worker's last push applied (ASP/SSP dedupe)
    - ``sketch``: ``[offset, count]``: this part ends with elements ``offset`` .. ``offset + count`` of the
      flattened admission sketch; absent or None: none
    """

    table: dict[str, Any]
    failover: FailoverNotice
    part: int
    parts: int
    rows: int
    version: int
    steps: int
    clock: int
    last: list[list[int]]
    sketch: list[int] | None


def read_seed_body(body: dict[str, Any], num_servers: int, num_workers: int, sketch_size: int
                   ) -> tuple[TableSeedBody, TableSpec, tuple[int, frozenset[int]]]:
    """A TABLE_SEED body, checked (BAD_HEADER naming the field): the body, its table and its failover as
    (topology version, dead servers). ``sketch_size``: the elements of a whole admission sketch."""
    def bad(what: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_HEADER, f"a table seed's {what}")

    try:
        topology = replicas.parse_notice(body, num_servers)
    except ValueError as exc:
        raise bad(f"failover: {exc}") from None
    if topology is None:
        raise bad("'failover' is missing")
    spec = read_table(body.get("table"))  # type: ignore[arg-type]
    parts, part, rows = body.get("parts"), body.get("part"), body.get("rows")
    if not is_int(parts, 1, MAX_SEED_PARTS + 1) or not is_int(part, 0, parts) or not is_int(rows, 0, MAX_INT):
        raise bad("'parts', 'part' and 'rows' must be integers with 0 <= part < parts")
    if spec.max_rows and rows > spec.max_rows:
        raise bad(f"'rows' ({rows}) is over the table's cap ({spec.max_rows})")
    if not all(is_int(body.get(name), 0, UNBOUNDED) for name in ("version", "steps")) \
            or not is_int(body.get("clock"), 0, MAX_TABLE_STEP + 1):
        raise bad(f"'version' and 'steps' must be non-negative integers, 'clock' one up to {MAX_TABLE_STEP}")
    last = body.get("last")
    if not isinstance(last, list) or len(last) > num_workers or not all(
            isinstance(p, list) and len(p) == 2 and is_int(p[0], 0, num_workers) and is_int(p[1]) for p in last) \
            or len({p[0] for p in last}) != len(last):
        raise bad("'last' must be [[worker rank, step], ...], each worker once")
    sketch = body.get("sketch")
    if sketch is not None and not (isinstance(sketch, list) and len(sketch) == 2 and spec.admit > 1
                                   and is_int(sketch[0], 0, sketch_size) and is_int(sketch[1], 1, sketch_size + 1)
                                   and sketch[0] + sketch[1] <= sketch_size):
        raise bad(f"'sketch' must be [offset, count] within the {sketch_size} elements of an admission sketch")
    out: TableSeedBody = {"table": spec.to_body(), "failover": {"version": topology[0], "dead": sorted(topology[1])},
                          "part": part, "parts": parts, "rows": rows, "version": body["version"],
                          "steps": body["steps"], "clock": body["clock"], "last": [list(p) for p in last],
                          "sketch": None if sketch is None else list(sketch)}
    return out, spec, topology
