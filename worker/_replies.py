"""The reply path: what a server's VALUES reply means for the caller's tensors.

Values arrive one of four ways, per key (see :class:`zps.protocol.messages.KeyEntry`): received in place into the
destination (uncompressed float32 on the CPU), in the message's fused frame (small keys), in the worker's shared
pull area (same host), or as a codec's buffers (full values or a delta to add, with ``pc``).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from zps.protocol.fields import UNBOUNDED, is_int
from zps.protocol.messages import ErrorCode, Kind, Message, ProtocolError
from zps.protocol.tensors import Decoders, FusedReader
from zps.telemetry.trace import Tracer

from ._engine import InPlace, Request
from ._progress import Progress
from ._shm import PULL, SharedAreas


def _copy_all(dests: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """``dest.copy_(value)`` for each pair: one dispatch for many small tensors where torch can (foreach kernels
    want one device per list), else one copy each (copies are idempotent, so a refused batch is simply redone)."""
    if len(dests) > 1 and hasattr(torch, "_foreach_copy_"):
        try:
            torch._foreach_copy_(dests, values)
            return
        except RuntimeError:
            pass
    for dest, value in zip(dests, values, strict=True):
        dest.copy_(value)


class Replies:
    """Implements :class:`zps.worker._engine.ReplyPath` for a client with ``decoders`` and shared ``areas``."""

    def __init__(self, decoders: Decoders, areas: SharedAreas) -> None:
        self.decoders = decoders
        self.areas = areas
        self.checkpoint = 0  # the newest checkpoint the servers said worker 0 asked for
        self.tracer = Tracer()  # --trace: the client's, recording a "decode" span per reply
        self.progress: Progress | None = None  # the client's: decode time and bytes, for --metrics-out

    def targets(self, header: Any, request: Request) -> dict[int, memoryview]:
        """The data parts of a VALUES reply that can be received straight into their destination. A malformed
        header gets no targets (``parse_frames`` then says what is wrong with it)."""
        try:
            if header.get("kind") != Kind.VALUES.value:
                return {}
            outs = request.outs
            targets: dict[int, memoryview] = {}
            index = 0
            for entry in header.get("keys", []):
                nf = entry.get("nf", 0)
                dest = outs.get(entry.get("key"))
                if (
                    nf == 1 and not entry.get("delta") and entry.get("codec", "none") == "none" and dest is not None
                    and dest.device.type == "cpu" and dest.dtype == torch.float32 and dest.is_contiguous()
                    and entry.get("bufs") == [["float32", dest.numel()]]
                ):
                    targets[index] = dest.numpy().data.cast("B")
                index += nf if is_int(nf, 0, UNBOUNDED) else 0
            return targets
        except Exception:  # noqa: BLE001  anything malformed is parse_frames' to report
            return {}

    def apply(self, msg: Message, request: Request) -> None:
        if msg.kind is not Kind.VALUES:
            return
        began = time.perf_counter()
        if self.tracer.enabled:
            with self.tracer("decode", server=msg.src, keys=len(msg.keys)):
                self._apply(msg, request)
        else:
            self._apply(msg, request)
        if self.progress is not None:
            self.progress.decode_s += time.perf_counter() - began
            self.progress.payload_recv += sum(f.received if isinstance(f, InPlace) else
                                              f.nbytes if isinstance(f, memoryview) else len(f) for f in msg.frames)

    def _apply(self, msg: Message, request: Request) -> None:
        asked = msg.body.get("ckpt")
        if is_int(asked, self.checkpoint + 1, UNBOUNDED):
            self.checkpoint = asked
        fused = FusedReader(msg.frames, msg.fused, "values") if msg.fused else None
        fused_dests: list[torch.Tensor] = []  # copied in one call at the end (many small keys)
        fused_values: list[torch.Tensor] = []
        for entry, frames in msg.entries():
            dest = request.outs.get(entry["key"])
            if dest is None:
                raise ProtocolError(ErrorCode.UNKNOWN_KEY, f"server sent key {entry['key']} that was not asked for")
            if fused is not None and "fz" in entry:
                fused_values.append(fused.get(entry, dest.numel(), "values"))
                fused_dests.append(dest)
                continue
            what = f"values of key {entry['key']}"
            if frames and isinstance(frames[0], InPlace):  # already in ``dest``; only its size is left to check
                if frames[0].received != frames[0].expected:
                    raise ProtocolError(ErrorCode.FRAME_SIZE, f"{what}: frame has {frames[0].received} bytes, "
                                                              f"expected {frames[0].expected}")
                continue
            if entry.get("pshm"):
                values = self.areas.area(entry["key"], PULL)
                if values is None:
                    raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: shared-memory reply without a segment")
            elif entry.get("delta") and dest.dtype == torch.float32:  # the server adds the same way to its view
                self.decoders.add(entry, frames, dest, what)
                continue
            else:
                values = self.decoders.decode(entry, frames, dest.numel(), torch.float32, what)
            if entry.get("delta"):
                dest.add_(values.to(dest.device))
            else:
                dest.copy_(values)
        if fused_dests:
            _copy_all(fused_dests, fused_values)

    def answered(self, request: Request, keys: set[int]) -> None:
        if request.marks:
            done = {m for m in request.marks if m[0] in keys}
            request.marks -= done
            self.areas.release(done)
