"""A server's VALUES replies: a pull's keys as frames, a fused frame, the worker's shared pull area, or a
compressed delta since that worker's last pull (with the server's own error feedback)."""
from __future__ import annotations

from typing import Any

import torch

from zps.protocol.codecs import Codec, make_codec
from zps.protocol.messages import KeyEntry, Kind, Message
from zps.protocol.shm import PULL
from zps.protocol.tensors import MIN_FUSED_KEYS, FusedWriter, encode_entry, entry_encoded, fusable

from ._metrics import ServerMetrics
from ._requests import PullRequest
from ._shm import WorkerSegments
from .store import KeyState


class Values:
    """Builds VALUES replies. ``snapshot``: values may change while ZeroMQ still sends them (ASP/SSP), so every
    frame is a copy; BSP never changes a value before every live worker received it, so it sends the store."""

    def __init__(self, name: str, segments: WorkerSegments, metrics: ServerMetrics, snapshot: bool) -> None:
        self.name = name
        self.segments = segments
        self.metrics = metrics
        self.snapshot = snapshot
        self._none = make_codec("none")
        # compressed pull: what each worker holds of each key, and the encoder that sends it deltas
        self._views: dict[tuple[int, int], tuple[torch.Tensor, Codec]] = {}

    def reply(self, p: PullRequest, checkpoint: int = 0) -> Message:
        """The VALUES of ``p``; ``checkpoint``: the newest checkpoint worker 0 asked for (every worker saves its
        part once it sees it)."""
        keys: list[KeyEntry] = []
        frames: list[Any] = []
        fused = [not shared and spec is None and fusable(s.numel)
                 for s, spec, shared in zip(p.states, p.pull_codecs, p.pull_shm, strict=True)]
        if sum(fused) < MIN_FUSED_KEYS:
            fused = [False] * len(fused)
        writer = FusedWriter()  # a copy (torch.cat), so a snapshot in every mode
        bufs: list[memoryview]
        for s, spec, shared, fuse in zip(p.states, p.pull_codecs, p.pull_shm, fused, strict=True):
            assert s.param is not None
            values, version = s.param, s.version
            if s.before is not None and p.step == s.version - 1:  # a replacement starts a step this key applied
                values, version = s.before, p.step
            entry: KeyEntry
            if shared:
                self.segments.view(p.worker, s, PULL, "pull of").copy_(values)
                self.metrics.shared("out", s.numel * 4)
                entry, bufs = {"codec": "none", "meta": {}, "bufs": [["float32", s.numel]], "nf": 0, "pshm": 1}, []
                encoded = s.numel * 4
            elif fuse:
                entry, bufs = {}, []
                writer.add(entry, values)
                encoded = s.numel * 4
            elif spec is None:
                copy = self.snapshot or values is s.before
                entry, bufs = encode_entry(self._none, values.clone() if copy else values)
                encoded = s.numel * 4
            else:
                entry, bufs = self._delta(p.worker, s, spec, values)
                encoded = sum(b.nbytes for b in bufs)
            self.metrics.tensor("out", s.name, spec if spec is not None and entry.get("delta") else "none",
                                s.numel * 4, encoded)
            entry["key"], entry["version"] = s.key, version
            keys.append(entry)
            frames.extend(bufs)
        body = {"ckpt": checkpoint} if checkpoint else {}
        msg = Message(Kind.VALUES, id=p.request_id, src=self.name, keys=keys, body=body, frames=frames)
        writer.attach(msg)
        return msg

    def _delta(self, worker: int, s: KeyState, spec: str, values: torch.Tensor) -> tuple[KeyEntry, list[memoryview]]:
        """Compressed pull: the first time the full values; then the change since this worker's last pull,
        encoded with ``spec`` (``values``: the key's, or those one version back). What the codec loses stays in
        (values - view) and is sent later: the server's own error feedback. The view is advanced by exactly what the
        worker decodes, so both stay identical."""
        found = self._views.get((worker, s.key))
        if found is None or found[1].spec() != spec:
            view = values.clone()
            self._views[(worker, s.key)] = (view, make_codec(spec, allow_import=True))  # spec checked by the caller
            entry, bufs = encode_entry(self._none, view)
            entry["delta"] = False
            return entry, bufs
        view, codec = found
        entry, bufs = encode_entry(codec, values - view)
        codec.add_decoded_(view, entry_encoded(entry, bufs, f"pull of {s.label()}"))  # as the worker adds it
        entry["delta"] = True
        return entry, bufs

    def view(self, worker: int, key: int) -> torch.Tensor | None:
        """What ``worker`` holds of ``key`` as far as compressed pulls go (None before its first one)."""
        found = self._views.get((worker, key))
        return None if found is None else found[0]

    def forget(self, worker: int) -> None:
        for key in [k for k in self._views if k[0] == worker]:
            del self._views[key]
