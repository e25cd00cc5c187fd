"""Building a client's data messages from its sharding plan: encoding, tensor fusion, splitting.

A tensor is cut into chunks by the plan (:mod:`zps.protocol.plan`); each server gets its chunks in messages of
about one chunk's bytes, so several are in flight at once and the server applies one while the next arrives.
Within a message, small uncompressed keys share one fused frame (:class:`zps.protocol.tensors.FusedWriter`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from zps.protocol.bodies import Commit, Hyperparameters
from zps.protocol.codecs import Codec, ErrorFeedback, make_codec
from zps.protocol.messages import KeyEntry, Kind, Message
from zps.protocol.plan import Chunk, Plan, cut_messages
from zps.protocol.tensors import MIN_FUSED_KEYS, FusedWriter, encode_entry, fusable

from ._shm import PULL, PUSH, Mark, SharedAreas

Tensors = Mapping[str, torch.Tensor]
# one key of a message being built: its entry, its frames, and its values when they go in the fused frame
_Item = tuple[KeyEntry, list[Any], torch.Tensor | None]


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a flat float32 tensor (a view where it can be)."""
    t = tensor.detach() if tensor.requires_grad else tensor
    if t.dtype != torch.float32:
        t = t.float()
    return t if t.dim() == 1 else t.reshape(-1)


class Messages:
    """The messages of push, pull and push_pull calls for ``plan``.

    ``push_codec`` builds a fresh push codec per key (None: uncompressed); tensors with fewer than
    ``compress_min`` elements go uncompressed. ``pull_codec`` (canonical spec or None) asks for compressed pulls.
    """

    def __init__(self, name: str, plan: Plan, groups: list[int], chunk_bytes: int,
                 push_codec: Callable[[], Codec] | None, pull_codec: str | None, compress_min: int,
                 areas: SharedAreas) -> None:
        self.name = name
        self.plan = plan
        self.group_of_param = groups
        self.chunk_bytes = chunk_bytes
        self.push_codec = push_codec
        self.pull_codec = pull_codec
        self.compress_min = compress_min
        self.areas = areas
        self.none = make_codec("none")
        self._by_name = {spec.name: plan.chunks_of(i) for i, spec in enumerate(plan.params)}
        self._codecs: dict[int, Codec] = {}
        self._views_of: dict[str, tuple[torch.Tensor, int, dict[int, torch.Tensor], int]] = {}  # see destinations

    # -- lookups ---------------------------------------------------------------------------------------
    def chunks(self, name: str) -> list[Chunk]:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"{name!r} was not declared; declared: {', '.join(self._by_name)}") from None

    def declared(self, name: str) -> tuple[list[Chunk], int]:
        """The chunks of ``name`` and its declared number of elements."""
        chunks = self.chunks(name)
        return chunks, self.plan.params[chunks[0].param].numel

    def compressed(self, chunk: Chunk) -> bool:
        """Small tensors (biases, norms) go uncompressed: their bytes are few and their precision matters."""
        return self.plan.params[chunk.param].numel >= self.compress_min

    def codec(self, chunk: Chunk) -> Codec:
        """The push codec of a chunk: one instance per key, since codecs and error feedback keep state."""
        codec = self._codecs.get(chunk.key)
        if codec is None:
            use = self.push_codec is not None and self.compressed(chunk)
            codec = self._codecs[chunk.key] = self.push_codec() if use and self.push_codec else self.none
        return codec

    def codecs(self) -> dict[int, Codec]:
        """The push codecs built so far, by key (their error-feedback residuals are the worker's state)."""
        return self._codecs

    # -- building --------------------------------------------------------------------------------------
    def _pull_options(self, chunk: Chunk, entry: KeyEntry, marks: set[Mark]) -> None:
        """How the values of ``chunk`` should come back: a compressed delta, the shared pull area, or a frame."""
        if self.pull_codec and self.compressed(chunk):
            entry["pc"] = self.pull_codec
        elif self.areas.reserve(chunk, PULL, marks) is not None:
            entry["pshm"] = 1

    def push(self, kind: Kind, grads: Mapping[str, torch.Tensor | None], step: int, marks: set[Mark],
             lr: float | list[float] | None = None, hp: Hyperparameters | None = None, hold: bool = False,
             checkpoint: int | None = None) -> list[tuple[int, Message]]:
        """PUSH or PUSH_PULL messages of ``grads`` for ``step`` (a None gradient: this worker has none for it).

        ``hp``: each group's hyper-parameters that differ from the declared optimizer's (:mod:`zps.protocol.bodies`);
        ``lr``: the learning rate (one, or one per group) -- sent as ``hp`` when ``hp`` is None, and the rate error
        feedback rescales its residual by; ``hold``: BSP, keep the step's aggregate until a commit; ``checkpoint``:
        a checkpoint asked for. Shared areas used are reserved into ``marks``."""
        body: dict[str, Any] = {}
        lrs = None if lr is None else [float(x) for x in lr] if isinstance(lr, (list, tuple)) else [float(lr)]
        if hp is None and lrs is not None:
            hp = [{"lr": x} for x in lrs]
        if hp is not None:
            body["hp"] = hp
        if hold:
            body["hold"] = 1
        if checkpoint is not None:
            body["ckpt"] = int(checkpoint)
        items: dict[int, list[_Item]] = {}
        for name, grad in grads.items():
            chunks, declared = self.declared(name)
            if grad is None:
                for chunk in chunks:
                    items.setdefault(chunk.server, []).append(({"key": chunk.key, "step": step, "nf": 0, "ng": 1},
                                                               [], None))
                continue
            values = flat(grad)
            if values.numel() != declared:
                raise ValueError(f"{name!r} has {values.numel()} elements but was declared with {declared}")
            whole = len(chunks) == 1
            for chunk in chunks:
                codec = self.codec(chunk)
                if isinstance(codec, ErrorFeedback) and lrs is not None:
                    group_lr = lrs[min(self.group_of_param[chunk.param], len(lrs) - 1)]
                    if group_lr > 0:
                        codec.set_lr(group_lr)
                part = values if whole else values[chunk.offset : chunk.offset + chunk.numel]
                area = self.areas.reserve(chunk, PUSH, marks) if codec is self.none else None
                small = None
                if area is not None:
                    area.copy_(part)  # the only copy: the server reads it in place
                    entry: KeyEntry = {"codec": "none", "meta": {}, "bufs": [["float32", chunk.numel]], "nf": 0,
                                       "shm": 1}
                    frames: list[Any] = []
                elif codec is self.none and fusable(chunk.numel):
                    entry, frames, small = {"nf": 0}, [], part  # the fused frame, or its own if alone (_message)
                else:
                    entry, frames = encode_entry(codec, part)
                entry["key"], entry["step"] = chunk.key, step
                if kind is Kind.PUSH_PULL and (self.pull_codec or self.areas.has(chunk.server)):
                    self._pull_options(chunk, entry, marks)  # else: values come back as frames
                items.setdefault(chunk.server, []).append((entry, frames, small))
        if kind is Kind.PUSH_PULL:  # a key without a gradient still comes back
            for entries in items.values():
                for entry, _, _ in entries:
                    if entry.get("ng") and (self.pull_codec or self.areas.has(self.plan.chunks[entry["key"]].server)):
                        self._pull_options(self.plan.chunks[entry["key"]], entry, marks)
        return self._messages(kind, body, items)

    def pull(self, outs: Tensors, step: int, marks: set[Mark], commit: Commit | None = None
             ) -> list[tuple[int, Message]]:
        """PULL messages for the values of ``outs`` as of ``step`` (BSP: after ``step`` updates); ``commit``: how
        the held step ``step - 1`` is applied (:mod:`zps.protocol.bodies`)."""
        items: dict[int, list[_Item]] = {}
        for name in outs:
            for chunk in self.chunks(name):
                entry: KeyEntry = {"key": chunk.key, "step": step, "nf": 0}
                self._pull_options(chunk, entry, marks)
                items.setdefault(chunk.server, []).append((entry, [], None))
        return self._messages(Kind.PULL, {"commit": commit} if commit is not None else {}, items)

    def inspect(self, names: list[str], step: int, norm_type: float | None) -> list[tuple[int, Message]]:
        """INSPECT messages: the norms and finiteness of the held aggregate of ``step`` of every chunk of ``names``
        (one message per server: the reply is small)."""
        by_server: dict[int, list[KeyEntry]] = {}
        for name in names:
            for chunk in self.chunks(name):
                by_server.setdefault(chunk.server, []).append({"key": chunk.key, "step": step, "nf": 0})
        body = {"norm": norm_type} if norm_type is not None else {}
        return [(server, Message(Kind.INSPECT, src=self.name, keys=keys, body=body))
                for server, keys in by_server.items()]

    def _messages(self, kind: Kind, body: dict[str, Any], items: dict[int, list[_Item]]) -> list[tuple[int, Message]]:
        """Each server's items cut into messages of about one chunk's bytes, small keys fused in each."""
        return [(server, self._message(kind, body, part)) for server, server_items in items.items()
                for part in cut_messages(server_items, self._numel, self.chunk_bytes)]

    def _numel(self, item: _Item) -> int:
        """The elements an item carries (a key without a gradient carries none)."""
        return 0 if item[0].get("ng") else self.plan.chunks[item[0]["key"]].numel

    def _message(self, kind: Kind, body: dict[str, Any], items: list[_Item]) -> Message:
        msg = Message(kind, src=self.name, body=body)
        fuse = sum(small is not None for _, _, small in items) >= MIN_FUSED_KEYS
        writer = FusedWriter()
        for entry, frames, small in items:
            if small is not None:
                if fuse:
                    writer.add(entry, small)
                else:
                    fields, frames = encode_entry(self.none, small)
                    entry.update(fields)
            msg.keys.append(entry)
            msg.frames.extend(frames)
        writer.attach(msg)
        return msg

    def destinations(self, outs: Tensors) -> dict[int, torch.Tensor]:
        """Key -> the flat view of ``outs`` it is written into. A model pulls into the same tensors every step, so
        the views are kept per (name, tensor, storage address) and built again only when one of those changes."""
        dest: dict[int, torch.Tensor] = {}
        for name, out in outs.items():
            cached = self._views_of.get(name)
            if (cached is not None and cached[0] is out and cached[1] == out.data_ptr() and out.numel() == cached[3]
                    and out.is_contiguous()):
                dest.update(cached[2])
                continue
            chunks, declared = self.declared(name)
            if out.numel() != declared:
                raise ValueError(f"pull destination {name!r} has {out.numel()} elements but was declared with "
                                 f"{declared}")
            if not out.is_contiguous():
                raise ValueError(f"pull destination {name!r} must be contiguous")
            view = out.detach().view(-1)
            views = {chunk.key: view[chunk.offset : chunk.offset + chunk.numel] for chunk in chunks}
            self._views_of[name] = (out, out.data_ptr(), views, declared)
            dest.update(views)
        return dest
