"""Tensors one worker hands every other through a server: rank 0's module buffers at ``synchronize()`` (DDP's
``broadcast_buffers``). Any dtype, bit for bit.

- PUT request (a worker to server 0): body ``name`` and ``tensors``: ``[[tensor name, dtype name, shape], ...]``,
  one raw frame each (key entries ``{"key": i, "nf": 1}`` count them); the server keeps the newest PUT only (a
  later name replaces it).
- GET request: body ``name``; the OK reply, once that PUT arrived, has the same body and frames.
"""
from __future__ import annotations

from typing import Any

import torch

from .messages import ErrorCode, KeyEntry, Kind, Message, ProtocolError
from .tensors import DTYPES, as_buffer, dtype_from_name, dtype_name, from_buffer

MAX_TENSORS = 4096


def put(src: str, name: str, tensors: dict[str, torch.Tensor]) -> Message:
    """The PUT of ``tensors`` under ``name``."""
    body = {"name": name, "tensors": [[n, dtype_name(t.dtype), list(t.shape)] for n, t in tensors.items()]}
    keys: list[KeyEntry] = [{"key": i, "nf": 1} for i in range(len(tensors))]
    return Message(Kind.PUT, src=src, body=body, keys=keys, frames=[as_buffer(t.detach()) for t in tensors.values()])


def read_tensors(msg: Message) -> tuple[str, dict[str, torch.Tensor]]:
    """A checked PUT (or GET reply): its name and tensors (views of the frames)."""
    name, rows = msg.body.get("name"), msg.body.get("tensors")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise ProtocolError(ErrorCode.BAD_HEADER, "'name' must be a string of 1 to 128 characters")
    if (not isinstance(rows, list) or len(rows) > MAX_TENSORS or len(rows) != len(msg.frames)
            or [e.get("nf") for e in msg.keys] != [1] * len(rows)):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"'tensors' must list at most {MAX_TENSORS} tensors, one per frame")
    out: dict[str, torch.Tensor] = {}
    for row, frame in zip(rows, msg.frames, strict=True):
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and len(row[0]) <= 1024
                and row[1] in DTYPES and isinstance(row[2], list) and len(row[2]) <= 16
                and all(type(d) is int and 0 <= d < 1 << 40 for d in row[2])):
            raise ProtocolError(ErrorCode.BAD_HEADER, "'tensors' rows are [name, dtype, shape]")
        numel = 1
        for d in row[2]:
            numel *= d
        what = f"tensor {row[0]!r} of {name!r}"
        out[row[0]] = from_buffer(frame, dtype_from_name(row[1]), numel, what).view(row[2])
    return name, out


def get(src: str, name: str) -> Message:
    return Message(Kind.GET, src=src, body={"name": name})


def read_get(msg: Message) -> str:
    name = msg.body.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise ProtocolError(ErrorCode.BAD_HEADER, "'name' must be a string of 1 to 128 characters")
    return name


def reply(request_id: int, src: str, stored: Message) -> Message:
    """The OK answer to a GET: the PUT's body and frames."""
    body: dict[str, Any] = dict(stored.body)
    return Message(Kind.OK, id=request_id, src=src, body=body, keys=list(stored.keys), frames=list(stored.frames))
