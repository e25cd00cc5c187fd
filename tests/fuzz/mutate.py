"""A structure-aware mutator of zps messages: real captured messages (msgpack header + raw frames) changed field by
field -- wrong types, huge and negative numbers, unicode digits, long strings, deep nesting, missing and unknown
fields -- or frame by frame (dropped, duplicated, truncated, flipped), plus random bytes and msgpack bombs.

Every choice comes from one ``random.Random``, so a seed reproduces a run exactly.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import msgpack

from zps.protocol import transport
from zps.protocol.messages import PROTOCOL_VERSION, Message

Frames = list[bytes]

# values that broke, or could break, a parser or a handler somewhere
INTERESTING: list[Any] = [
    0, 1, -1, 2, 255, 256, 2**31 - 1, 2**31, 2**32, 2**53, 2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63),
    0.5, -0.0, 1e300, -1e300, float("inf"), float("-inf"), float("nan"), 3.4e38,
    "", "x", "x" * 5000, "worker:\u00b2", "worker:\u0663", "worker:-1", "worker:" + "9" * 40, "server:0", "coordinator",
    "float32", "float16", "bfloat16", "none", "topk", "topk:ratio=2", "onebit", "../../etc/passwd", "\x00",
    None, True, False, [], {}, [[[[[]]]]], [0] * 300, {"a": {"b": {"c": {}}}}, b"", b"\xff" * 64,
]
FIELDS = ["v", "kind", "id", "src", "keys", "body", "fz", "key", "step", "numel", "nf", "codec", "meta", "bufs", "shm",
          "pshm", "pc", "name", "offset", "dtype", "group", "optimizer", "groups", "lr", "hp", "hold", "commit", "mul",
          "skip", "ng", "norm", "tensors", "role", "rank", "pid", "host", "address", "exit_code", "failure",
          "checkpoint", "file", "size", "info", "ckpt"]
KINDS = ["register", "topology", "barrier", "heartbeat", "done", "shutdown", "saved", "notice", "init", "push", "pull",
         "push_pull", "leave", "stats", "inspect", "put", "get", "table", "rows_pull", "rows_push", "ok", "values",
         "error", "nonsense"]


@contextlib.contextmanager
def capturing() -> Iterator[list[Frames]]:
    """Record, as bytes, every message sent from a DEALER (a client of a server or of the coordinator)."""
    seen: list[Frames] = []
    real = transport.send

    def send(sock: Any, msg: Message, identity: bytes | None = None) -> int:
        if identity is None:
            seen.append([bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in msg.to_frames()])
        return real(sock, msg, identity)

    transport.send = send
    try:
        yield seen
    finally:
        transport.send = real


def _paths(obj: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if depth > 6:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k), depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, (*prefix, i), depth + 1)


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


class Mutator:
    """Turns seed messages into hostile ones; :meth:`next` gives one message's frames."""

    def __init__(self, seeds: list[Frames], rng: random.Random) -> None:
        if not seeds:
            raise ValueError("no seed messages to mutate")
        self.seeds, self.rng = seeds, rng

    def next(self) -> Frames:
        r = self.rng.random()
        if r < 0.05:
            return self.random_bytes()
        if r < 0.08:
            return self.bomb()
        frames = list(self.rng.choice(self.seeds))
        if r < 0.75:
            frames = self.mutate_header(frames)
        if self.rng.random() < 0.3 or r >= 0.75:
            frames = self.mutate_frames(frames)
        return frames

    # -- headers ---------------------------------------------------------------------------------------
    def value(self) -> Any:
        rng = self.rng
        pick = rng.random()
        if pick < 0.6:
            return rng.choice(INTERESTING)
        if pick < 0.75:
            return rng.randint(-(2**63), 2**64 - 1)
        if pick < 0.85:
            return rng.choice(KINDS)
        if pick < 0.95:
            return {rng.choice(FIELDS): rng.choice(INTERESTING)}
        return [rng.choice(INTERESTING) for _ in range(rng.randint(0, 4))]

    def mutate_header(self, frames: Frames) -> Frames:
        try:
            head = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
        except Exception:
            return frames
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            head = self._mutate_once(head)
        try:
            packed = msgpack.packb(head, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return frames
        return [packed, *frames[1:]]

    def _mutate_once(self, head: Any) -> Any:
        rng = self.rng
        paths = list(_paths(head))
        path = rng.choice(paths)
        op = rng.random()
        if not path:
            return self.value() if op < 0.1 else head
        parent, last = _get(head, path[:-1]), path[-1]
        if op < 0.55:
            parent[last] = self.value()
        elif op < 0.7 and isinstance(parent, dict):
            del parent[last]
        elif op < 0.8 and isinstance(parent, dict):
            parent[rng.choice(FIELDS)] = self.value()
        elif op < 0.9 and isinstance(parent[last], int) and not isinstance(parent[last], bool):
            parent[last] = rng.choice((parent[last] + 1, parent[last] - 1, parent[last] * 2**20, -parent[last]))
        elif isinstance(parent[last], list) and parent[last]:
            parent[last] = parent[last] * rng.choice((2, 3))  # duplicated entries (keys twice, extra bufs)
        else:
            parent[last] = str(parent[last])[:50]
        return head

    # -- frames ----------------------------------------------------------------------------------------
    def mutate_frames(self, frames: Frames) -> Frames:
        rng = self.rng
        frames = list(frames)
        op = rng.random()
        if op < 0.2 and len(frames) > 1:
            del frames[rng.randrange(1, len(frames))]
        elif op < 0.35:
            frames.append(rng.choice(frames))
        elif op < 0.55:
            i = rng.randrange(len(frames))
            frames[i] = frames[i][: rng.randint(0, max(0, len(frames[i]) - 1))]
        elif op < 0.75:
            i = rng.randrange(len(frames))
            data = bytearray(frames[i])
            for _ in range(rng.randint(1, 8)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            frames[i] = bytes(data)
        elif op < 0.85:
            i = rng.randrange(len(frames))
            frames[i] = frames[i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif op < 0.95:
            frames.extend([b""] * rng.randint(1, 50))
        else:
            frames = [frames[0]]
        return frames

    def random_bytes(self) -> Frames:
        rng = self.rng
        return [bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))) for _ in range(rng.randint(1, 3))]

    def bomb(self) -> Frames:
        """Small messages that claim or build much: huge declared lengths, deep nesting, many tiny objects."""
        rng = self.rng
        return rng.choice([
            [b"\xdd\xff\xff\xff\xff"],  # an array claiming 4G elements
            [b"\xdf\xff\xff\xff\xff"],  # a map claiming 4G pairs
            [b"\xdb\xff\xff\xff\xff" + b"a" * 10],  # a string claiming 4 GiB
            [b"\x91" * 100_000],  # nesting 100k deep
            [b"\xdd" + (200_000).to_bytes(4, "big") + b"\x90" * 200_000],  # 200k empty arrays
            [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "push", "id": 1, "src": "worker:0",
                            "keys": [{"key": i, "step": 0, "nf": 1} for i in range(5000)]})],
        ])
