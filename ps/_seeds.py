"""Seeds (``--replicas``): a primary's whole state of some keys, sent to a backup that is new to them after a failover
(re-replication) or that missed updates; read and checked whole by the backup before anything changes.

A seed carries, per key, what a copy needs to apply the next update the way the primary does and to become the
primary itself later: the values, the torch.optim state tensors, the version, the learning rate, (ASP/SSP) the last
push of each worker applied and, where kept, the values one version back. The wire fields are
:class:`zps.protocol.messages.KeyEntry`'s (SEED requests) and :class:`zps.protocol.bodies.SeedBody` (read by
:func:`zps.protocol.bodies.read_seed`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from zps.protocol import bodies
from zps.protocol.bodies import SeedBody, read_hp
from zps.protocol.codecs import make_codec
from zps.protocol.fields import UNBOUNDED, is_int
from zps.protocol.messages import ErrorCode, KeyEntry, Kind, Message, ProtocolError
from zps.protocol.tensors import DTYPES, as_buffer, dtype_from_name, dtype_name, encode_entry, from_buffer

from .store import KeyState

MAX_STATE_TENSORS = 8  # torch.optim's element-wise optimizers keep at most 3 per parameter
MAX_SEED_BYTES = 64 << 20  # one SEED message carries keys up to this many bytes (a larger key travels alone)
MAX_SEED_FRAMES = 4096
# how a server decodes a key's frames: (entry, frames, elements, dtype, what) -> tensor (zps.protocol.tensors.Decoders)
Decode = Callable[[KeyEntry, list[Any], int, torch.dtype, str], torch.Tensor]


def seed_messages(states: list[KeyState], optimizer_state: Callable[[KeyState], dict[str, torch.Tensor]],
                  body: SeedBody, src: str, ids: Iterator[int], max_bytes: int) -> Iterator[tuple[Message, list[int]]]:
    """The SEED messages that copy ``states`` (each with its optimizer state) whole, in batches of at most
    ``max_bytes``; each with the keys it carries. Every tensor is copied: the primary keeps stepping meanwhile."""
    plain = make_codec("none")
    keys: list[KeyEntry] = []
    frames: list[Any] = []
    carried: list[int] = []
    size = 0
    for state in states:
        assert state.param is not None
        tensors = {name: t.detach().clone() for name, t in optimizer_state(state).items()
                   if isinstance(t, torch.Tensor)}
        nbytes = state.numel * 4 + sum(t.numel() * t.element_size() for t in tensors.values())
        if keys and (size + nbytes > min(max_bytes, MAX_SEED_BYTES)
                     or len(frames) + 1 + len(tensors) > MAX_SEED_FRAMES):
            yield Message(Kind.SEED, id=next(ids), src=src, keys=keys, frames=frames, body=dict(body)), carried
            keys, frames, carried, size = [], [], [], 0
        entry, bufs = encode_entry(plain, state.param.detach().clone())
        if state.before is not None:  # the values one version back travel as a second frame
            bufs = bufs + encode_entry(plain, state.before.detach().clone())[1]
            nbytes += state.numel * 4
        entry.update({"key": state.key, "name": state.name, "offset": state.offset, "numel": state.numel,
                      "group": state.group, "home": state.home, "version": state.version, "hp": state.hp,
                      "ostate": [[n, dtype_name(t.dtype), list(t.shape)] for n, t in tensors.items()],
                      "last": [[w, s] for w, s in sorted(state.last_step.items())],
                      "before": state.before is not None})
        entry["nf"] = len(bufs) + len(tensors)
        keys.append(entry)
        frames += bufs + [as_buffer(t) for t in tensors.values()]
        carried.append(state.key)
        size += nbytes
    if keys:
        yield Message(Kind.SEED, id=next(ids), src=src, keys=keys, frames=frames, body=dict(body)), carried


@dataclass
class SeedKey:
    """One key of a SEED request, checked: what the backup sets it to."""

    entry: KeyEntry
    values: torch.Tensor
    state: dict[str, torch.Tensor]
    version: int
    hp: dict[str, Any] | None
    last_step: dict[int, int]
    before: torch.Tensor | None = None  # the values one version back (zps.ps.store.KeyState.before)


@dataclass
class Seed:
    """A SEED request, checked whole: its id, the sending server (name, rank), the topology it seeds for, the
    optimizer, the keys."""

    request_id: int
    src: str
    sender: int
    topology: tuple[int, frozenset[int]]  # the failover it follows: (topology version, dead servers)
    optimizer: str
    groups: list[dict[str, Any]]
    keys: list[SeedKey]
    identity: bytes = b""  # the sender's on the server's socket (where an answer that waited goes)


def read_seed(msg: Message, sender: int, num_servers: int, num_workers: int, max_key_elements: int,
              check_optimizer: Callable[[str, list[Any], int], None], decode: Decode) -> Seed:
    """Check a whole SEED request (ProtocolError naming the problem): a live server's, a failover notice, a known
    optimizer, well-typed keys whose frames have exactly the sizes declared. Nothing is changed here. Whether its
    sender is the primary of its keys is checked when it is taken (:meth:`._replicas.Replication.check_seed`),
    once this server heard of the failover it follows from the coordinator itself (``sender``: its rank, checked
    by :meth:`._replicas.Replication.sender`)."""
    if msg.fused:
        raise ProtocolError(ErrorCode.BAD_HEADER, "a seed carries no fused frame")
    body, topology = bodies.read_seed(msg.body, num_servers)
    optimizer, groups = body["optimizer"], body["groups"]
    out: list[SeedKey] = []
    seen: set[int] = set()
    for entry, frames in msg.entries():
        key, nf = entry["key"], entry.get("nf", 0)
        what = f"seed of key {key}"
        if key in seen:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"key {key} appears twice in one seed")
        seen.add(key)
        numel, name, chunk_offset = entry.get("numel"), entry.get("name", ""), entry.get("offset", 0)
        group, home, version, hp = entry.get("group", 0), entry.get("home"), entry.get("version"), entry.get("hp")
        if not is_int(numel, 0, max_key_elements + 1):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'numel' must be an integer in [0, {max_key_elements}]")
        if not isinstance(name, str) or len(name) > 1024 or not is_int(chunk_offset, 0, UNBOUNDED):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: bad 'name' or 'offset'")
        if not is_int(group, 0, len(groups)):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'group' must be one of the {len(groups)} groups")
        if not is_int(home, 0, num_servers):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'home' must be a server rank")
        if not is_int(version):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'version' must be a non-negative integer")
        if hp is not None:
            checked = read_hp([hp])
            assert checked is not None
            hp = checked[0]
        last = entry.get("last", [])
        if not isinstance(last, list) or len(last) > num_workers or not all(
                isinstance(p, list) and len(p) == 2 and is_int(p[0], 0, num_workers) and is_int(p[1]) for p in last):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'last' must be [[worker rank, step], ...]")
        described = entry.get("ostate", [])
        if not isinstance(described, list) or len(described) > MAX_STATE_TENSORS:
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'ostate' must list at most {MAX_STATE_TENSORS} "
                                                      "tensors")
        if entry.get("codec") != "none" or not isinstance(entry.get("bufs"), list) or len(entry["bufs"]) != 1:
            raise ProtocolError(ErrorCode.BAD_CODEC, f"{what}: the values travel uncompressed, in one frame")
        before = entry.get("before", False)
        if not isinstance(before, bool):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'before' must be true or false")
        values_frames = 2 if before else 1
        if nf != values_frames + len(described) or len(frames) != nf:
            raise ProtocolError(ErrorCode.FRAME_COUNT, f"{what}: {nf} frames for the values{' (twice)' * before} "
                                                       f"and {len(described)} optimizer state tensors")
        values = decode(entry, frames[:1], numel, torch.float32, what)
        previous = decode(entry, frames[1:2], numel, torch.float32, f"{what}, values one version back") \
            if before else None
        state: dict[str, torch.Tensor] = {}
        for item, frame in zip(described, frames[values_frames:], strict=True):
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and len(item[0]) <= 64
                    and item[1] in DTYPES and isinstance(item[2], list) and len(item[2]) <= 1
                    and all(is_int(d, 0, UNBOUNDED) for d in item[2])) or item[0] in state:
                raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: an 'ostate' item must be [name, dtype, shape] "
                                                          "with a scalar or 1-D shape, each name once")
            count = math.prod(item[2])
            if item[2] and count != numel:
                raise ProtocolError(ErrorCode.SHAPE_MISMATCH, f"{what}: optimizer state {item[0]!r} has "
                                                              f"{count} elements, not the key's 'numel'")
            dtype = dtype_from_name(item[1])
            state[item[0]] = from_buffer(frame, dtype, count, f"{what}, optimizer state {item[0]!r}").clone() \
                .reshape(item[2])
        out.append(SeedKey(entry, values, state, version, hp, {w: s for w, s in last},
                           None if previous is None else previous.clone()))
        check_optimizer(optimizer, groups, group)
    return Seed(msg.id, msg.src, sender, topology, optimizer, groups, out)
