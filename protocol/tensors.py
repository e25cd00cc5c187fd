"""Tensors to wire buffers and back: dtype names, zero-copy views, and the encoded-key fields of a header."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from .codecs import Codec, Encoded, make_codec, parse_codec_spec
from .codecs.quantize import NoneCodec
from .fields import show
from .messages import ErrorCode, KeyEntry, Message, ProtocolError

T = TypeVar("T")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE = {d: torch.empty((), dtype=d).element_size() for d in DTYPES.values()}
_NUMPY = {d: torch.empty((), dtype=d).numpy().dtype for d in DTYPES.values() if d is not torch.bfloat16}
# Frames are read-only buffers; torch warns when it wraps one, though zps never writes to them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def dtype_from_name(name: Any) -> torch.dtype:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ProtocolError(ErrorCode.DTYPE_MISMATCH, f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot cross the wire; use one of {', '.join(DTYPES)}") from None


def as_buffer(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (moved to host first if it is on a device)."""
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    tensor = tensor.contiguous()
    if tensor.dtype is torch.bfloat16:  # numpy has no bfloat16: view the bits
        tensor = tensor.view(torch.int16)
    return tensor.numpy().data.cast("B")


def from_buffer(frame: Any, dtype: torch.dtype, numel: int, what: str) -> torch.Tensor:
    """A 1-D tensor viewing ``frame``'s bytes (zero copy, read-only source); checks the byte size first."""
    view = memoryview(frame.buffer if hasattr(frame, "buffer") else frame).cast("B")
    itemsize = _ITEMSIZE[dtype]
    if view.nbytes != numel * itemsize:
        raise ProtocolError(
            ErrorCode.FRAME_SIZE,
            f"{what}: frame has {view.nbytes} bytes, expected {numel} x {itemsize} = {numel * itemsize}",
        )
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    if dtype is torch.bfloat16:
        return torch.from_numpy(np.frombuffer(view, dtype=np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.frombuffer(view, dtype=_NUMPY[dtype]))


def encode_entry(codec: Codec, tensor: torch.Tensor) -> tuple[KeyEntry, list[memoryview]]:
    """Encode ``tensor`` with ``codec``; return the header fields for its key entry and its frames."""
    if type(codec) is NoneCodec:  # the common case, on every small key: the tensor's own bytes, nothing around them
        entry: KeyEntry = {"codec": "none", "meta": {}, "bufs": [[dtype_name(tensor.dtype), tensor.numel()]], "nf": 1}
        return entry, [as_buffer(tensor)]
    encoded = codec.encode(tensor)
    frames = [as_buffer(b) for b in encoded.buffers]
    entry = {
        "codec": codec.spec(),
        "meta": encoded.meta,
        "bufs": [[dtype_name(b.dtype), b.numel()] for b in encoded.buffers],
        "nf": len(frames),
    }
    return entry, frames


# Keys up to this size travel in their message's fused frame rather than a frame each (when not compressed), once a
# message has at least MIN_FUSED_KEYS of them (a lone small key keeps a frame of its own: nothing to save).
FUSE_MAX_BYTES = 64 * 1024
MIN_FUSED_KEYS = 2


def fusable(numel: int) -> bool:
    """Whether an uncompressed float32 key of ``numel`` elements may share its message's fused frame."""
    return numel * 4 <= FUSE_MAX_BYTES


class FusedWriter:
    """The fused frame of one message: :meth:`add` gives each small key its element offset (``fz``), and
    :meth:`attach` puts the frame last in the message. The frame is always a new copy (``torch.cat``), so it is a
    snapshot even if the tensors change while it is sent."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.numel = 0

    def add(self, entry: KeyEntry, tensor: torch.Tensor) -> None:
        entry["nf"], entry["fz"] = 0, self.numel
        self.numel += tensor.numel()
        self.tensors.append(tensor)

    def attach(self, msg: Message) -> None:
        if not self.tensors:
            return
        try:
            joined = torch.cat(self.tensors)
        except RuntimeError:  # on several devices: through the host
            joined = torch.cat([t.to("cpu") for t in self.tensors])
        msg.fused = self.numel
        msg.frames.append(as_buffer(joined))


class FusedReader:
    """The fused frame of a message, sliced per key with range checks (the frame is viewed, never copied)."""

    def __init__(self, frames: list[Any], numel: int, what: str) -> None:
        self.numel = numel
        self.values = from_buffer(frames[-1], torch.float32, numel, f"{what}: fused frame") if numel else None

    def get(self, entry: KeyEntry, numel: int, what: str) -> torch.Tensor:
        """The ``numel`` elements of ``entry``'s key; ``what`` names the request in an error."""
        offset = entry["fz"]
        if self.values is None or offset + numel > self.numel:
            raise ProtocolError(
                ErrorCode.FRAME_SIZE,
                f"{what}: key {entry['key']} elements [{offset}:{offset + numel}] are outside the fused frame of "
                f"{self.numel}",
            )
        return self.values[offset : offset + numel]


def entry_encoded(entry: KeyEntry, frames: list[Any], what: str) -> Encoded:
    """Rebuild the :class:`Encoded` of one key entry from its header fields and frames, validating sizes."""
    bufs = entry.get("bufs", [])
    meta = entry.get("meta", {})
    if not isinstance(bufs, list) or len(bufs) != len(frames):
        described = len(bufs) if isinstance(bufs, list) else "?"
        raise ProtocolError(ErrorCode.FRAME_COUNT, f"{what}: 'bufs' describes {described} buffers but {len(frames)} "
                                                   "frames came")
    if not isinstance(meta, dict):
        raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: 'meta' must be a map")
    buffers = []
    for i, (desc, frame) in enumerate(zip(bufs, frames, strict=False)):
        if not (isinstance(desc, list) and len(desc) == 2 and isinstance(desc[1], int) and desc[1] >= 0):
            raise ProtocolError(ErrorCode.BAD_HEADER, f"{what}: bufs[{i}] must be [dtype, numel], got {desc!r}")
        buffers.append(from_buffer(frame, dtype_from_name(desc[0]), desc[1], f"{what} buffer {i}"))
    return Encoded(meta=meta, buffers=buffers)


class Decoders:
    """Codec instances for decoding, by spec, built on first use.

    A spec that arrives from the network may name a registered codec, or an import path only when this process
    was configured with that same path: a peer never makes us import a module of its choosing.
    """

    def __init__(self, configured: tuple[str, ...] = ()) -> None:
        self._allowed = {parse_codec_spec(s)[0] for s in configured if s}
        self._cache: dict[str, Codec] = {}

    def get(self, spec: Any, what: str) -> Codec:
        codec = self._cache.get(spec) if isinstance(spec, str) else None
        if codec is not None:
            return codec
        if not isinstance(spec, str):
            raise ProtocolError(ErrorCode.BAD_CODEC, f"{what}: 'codec' must be a string, got {spec!r}")
        try:
            name, _ = parse_codec_spec(spec)
            codec = make_codec(spec, allow_import=name in self._allowed)
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_CODEC, f"{what}: {exc}") from None
        self._cache[spec] = codec
        return codec

    def decode(self, entry: KeyEntry, frames: list[Any], numel: int, dtype: torch.dtype, what: str) -> torch.Tensor:
        """One key entry as a flat CPU tensor of ``numel`` elements of ``dtype``.

        An uncompressed entry must carry exactly ``[dtype, numel]`` and comes back as a zero-copy view of its frame;
        any other codec decodes into a new tensor.
        """
        if entry.get("codec", "none") == "none":
            want = [dtype_name(dtype), numel]
            bufs = entry.get("bufs")
            if bufs != [want]:
                got = bufs[0] if isinstance(bufs, list) and len(bufs) == 1 else bufs
                wrong_dtype = isinstance(got, list) and bool(got) and got[0] != want[0]
                raise ProtocolError(
                    ErrorCode.DTYPE_MISMATCH if wrong_dtype else ErrorCode.SHAPE_MISMATCH,
                    f"{what}: got {show(got)}, not the dtype and size the key is declared with",
                    detail=f"declared {want!r}",
                )
            if len(frames) != 1:
                raise ProtocolError(ErrorCode.FRAME_COUNT,
                                    f"{what}: an uncompressed key has one frame, {len(frames)} came")
            return from_buffer(frames[0], dtype, numel, what)
        out = self._run(entry, frames, what, lambda codec, encoded: codec.decode(encoded, numel, dtype, "cpu"))
        if out.numel() != numel:
            raise ProtocolError(ErrorCode.SHAPE_MISMATCH,
                                f"{what}: decoded {out.numel()} elements, not the key's size", detail=f"it has {numel}")
        return out

    def add(self, entry: KeyEntry, frames: list[Any], target: torch.Tensor, what: str) -> None:
        """Add one key entry (a delta) to the flat float32 ``target`` in place: what adding :meth:`decode`'s result
        computes, without a dense temporary where the codec is sparse (:meth:`Codec.add_decoded_`)."""
        if entry.get("codec", "none") == "none":
            target.add_(self.decode(entry, frames, target.numel(), torch.float32, what).to(target.device))
            return
        self._run(entry, frames, what, lambda codec, encoded: codec.add_decoded_(target, encoded))

    def _run(self, entry: KeyEntry, frames: list[Any], what: str, use: Callable[[Codec, Encoded], T]) -> T:
        """``use(codec, encoded)`` for a compressed entry; what the codec raises becomes a ``BAD_CODEC`` error."""
        encoded = entry_encoded(entry, frames, what)
        codec = self.get(entry["codec"], what)
        try:
            return use(codec, encoded)
        except ProtocolError:
            raise
        except Exception as exc:
            raise ProtocolError(ErrorCode.BAD_CODEC,
                                f"{what}: codec {entry.get('codec')!r} could not decode: {exc}") from None
