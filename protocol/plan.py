"""The sharding plan: parameters cut into chunks, chunks spread over servers balanced by bytes.

The plan is a pure function of (names, shapes, dtypes, number of servers, chunk size), so every process computes
the same plan with nothing to agree on. A chunk's key is its index in the plan. Parameters listed in
``whole`` (e.g. for LAMB/LARS, whose update reads a whole tensor) are never cut.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
# the most keys a worker puts in one message; a server takes twice as many (zps.protocol.messages.parse_frames), and
# refuses more at once: serving a message costs time per key, and a message must not hold the server's loop long
MAX_KEYS_PER_MESSAGE = 4096
_Item = TypeVar("_Item")


@dataclass(frozen=True)
class ParamSpec:
    """A declared parameter: its name, shape and element size in bytes."""

    name: str
    shape: tuple[int, ...]
    itemsize: int = 4

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Chunk:
    """A contiguous slice ``[offset, offset + numel)`` of a flattened parameter, owned by one server."""

    key: int
    param: int  # index of the parameter in the plan's params
    name: str
    offset: int
    numel: int
    server: int


@dataclass(frozen=True)
class Plan:
    params: tuple[ParamSpec, ...]
    chunks: tuple[Chunk, ...]
    num_servers: int

    def chunks_of(self, param: int) -> list[Chunk]:
        return [c for c in self.chunks if c.param == param]

    def chunks_on(self, server: int) -> list[Chunk]:
        return [c for c in self.chunks if c.server == server]

    def bytes_per_server(self) -> list[int]:
        load = [0] * self.num_servers
        for c in self.chunks:
            load[c.server] += c.numel * self.params[c.param].itemsize
        return load


def make_plan(
    params: Sequence[ParamSpec],
    num_servers: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    whole: Iterable[str] = (),
) -> Plan:
    """Cut each parameter into chunks of at most ``chunk_bytes`` and assign them to servers.

    Assignment is greedy by size (largest chunk first to the least-loaded server, ties to the lowest server
    index), which keeps the byte load within one chunk of balanced; keys stay in declaration order, so the
    front layers have the lowest keys.
    """
    if num_servers < 1:
        raise ValueError(f"num_servers must be >= 1, got {num_servers}")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"parameter names must be unique; repeated: {', '.join(dup)}")
    whole = set(whole)
    pieces: list[tuple[int, str, int, int]] = []  # (param index, name, offset, numel)
    for index, spec in enumerate(params):
        numel = spec.numel
        per_chunk = max(1, chunk_bytes // max(1, spec.itemsize))
        if spec.name in whole or numel <= per_chunk:
            pieces.append((index, spec.name, 0, numel))
            continue
        count = math.ceil(numel / per_chunk)
        base, extra = divmod(numel, count)  # equal-sized chunks, the first `extra` one element longer
        offset = 0
        for i in range(count):
            size = base + (1 if i < extra else 0)
            pieces.append((index, spec.name, offset, size))
            offset += size
    order = sorted(range(len(pieces)), key=lambda i: (-pieces[i][3] * params[pieces[i][0]].itemsize, i))
    heap = [(0, s) for s in range(num_servers)]
    owner = [0] * len(pieces)
    for i in order:
        load, server = heapq.heappop(heap)
        owner[i] = server
        heapq.heappush(heap, (load + pieces[i][3] * params[pieces[i][0]].itemsize, server))
    chunks = tuple(
        Chunk(key=i, param=p, name=name, offset=off, numel=n, server=owner[i])
        for i, (p, name, off, n) in enumerate(pieces)
    )
    return Plan(params=tuple(params), chunks=chunks, num_servers=num_servers)


def cut_messages(items: Iterable[_Item], numel: Callable[[_Item], int],
                 limit: int = DEFAULT_CHUNK_BYTES, max_items: int = MAX_KEYS_PER_MESSAGE) -> list[list[_Item]]:
    """``items`` (one server's keys of a request, in plan order) grouped into the messages that carry them: a new
    message once the next item would take the current one past ``limit`` bytes at 4 bytes an element, or past
    ``max_items`` keys; an item larger than ``limit`` travels alone. The one rule for a worker's messages and
    ``zps plan``'s model of them."""
    out: list[list[_Item]] = []
    size = 0
    for item in items:
        nbytes = 4 * numel(item)
        if out and size + nbytes <= limit and len(out[-1]) < max_items:
            out[-1].append(item)
            size += nbytes
        else:
            out.append([item])
            size = nbytes
    return out
