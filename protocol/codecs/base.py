"""The codec interface: a tensor becomes (meta, buffers) and back, on the tensor's own device.

A codec instance belongs to one key on one process, so stateful codecs (DGC momentum, PowerSGD warm start) keep
their state on ``self``. ``decode`` must depend only on its arguments and the codec's parameters (the server
decodes with a fresh instance built from the same spec). ``meta`` must be msgpack-serialisable (ints, floats,
strings, lists, dicts); ``buffers`` are contiguous tensors whose raw bytes cross the wire as frames, so they
are what the wire ratio counts.
"""
from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class Encoded:
    """One encoded tensor: small msgpack-able ``meta`` plus raw ``buffers`` (contiguous tensors)."""

    meta: dict[str, Any] = field(default_factory=dict)
    buffers: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


class Codec(ABC):
    """Base class of every codec. Subclasses set ``name`` and implement ``encode``/``decode``.

    Class flags tell tests and the server what to expect: ``exact`` (decode(encode(x)) == x bit for bit),
    ``unbiased`` (E[decode(encode(x))] == x), ``stateful`` (encode depends on earlier calls), ``copies`` (no buffer
    of ``encode``'s result ever views its input, so a caller may reuse the input's memory once it is encoded: error
    feedback then keeps its residual in place). Parameters live in
    ``self.params`` (a dict), which ``spec()`` writes back out; :func:`resolve_params` checks them.
    """

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    unbiased: ClassVar[bool] = False
    stateful: ClassVar[bool] = False
    copies: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        if params:
            raise TypeError(f"codec {self.name!r} takes no parameter {', '.join(sorted(params))}")

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> Encoded:
        """Encode a tensor of any shape (flattened) on its own device."""

    @abstractmethod
    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """Return a flat tensor of ``numel`` elements of ``dtype`` on ``device``.

        The result never aliases ``encoded.buffers`` (they may view read-only wire frames), so callers may write
        into it. Malformed input (sizes or meta that do not fit ``numel``) raises ``ValueError``.
        """

    def feedback_problem(self) -> str | None:
        """Why error feedback around this codec may diverge (its error is not smaller than its input: not a
        contraction), or None. Error feedback keeps what the codec loses and sends it again; that converges only
        when the loss is a fraction of what was sent. :class:`ErrorFeedback` refuses such a codec, and a server
        refuses it as a pull codec (pulls keep the server's own error feedback)."""
        return None

    def add_decoded_(self, target: torch.Tensor, encoded: Encoded, alpha: float = 1.0) -> None:
        """``target += alpha * decode(encoded)`` in place, for a flat ``target`` of the encoded tensor's size:
        element for element what decoding then adding computes (error feedback subtracts: alpha -1). Sparse codecs
        override it to touch only the positions they sent; malformed input raises ``ValueError`` as ``decode``
        does."""
        decoded = self.decode(encoded, target.numel(), target.dtype, target.device)
        if alpha == -1:
            target.sub_(decoded)
        else:
            target.add_(decoded, alpha=alpha)

    def spec(self) -> str:
        """The spec string that rebuilds this codec (``name:k=v,...``); computed once, it goes with every push."""
        cached = self.__dict__.get("_spec")
        if cached is None:
            name = getattr(self, "_spec_name", None) or self.name  # set by make_codec for codecs loaded by path
            params = {k: v for k, v in getattr(self, "params", {}).items() if v is not None}
            cached = name if not params else name + ":" + ",".join(f"{k}={v}" for k, v in sorted(params.items()))
            self.__dict__["_spec"] = cached
        return cached


# ---- helpers for codec implementations ---------------------------------------------------------------------


def resolve_params(codec: str, given: Mapping[str, Any], schema: Mapping[str, tuple[type, Any]]) -> dict[str, Any]:
    """Check ``given`` against ``schema`` (``name -> (type, default)``) and return every parameter's value.

    Unknown names raise ``TypeError``; wrong types raise ``ValueError``. An int is accepted where a float is
    expected; a default of ``None`` makes the parameter optional.
    """
    unknown = sorted(set(given) - set(schema))
    if unknown:
        accepted = ", ".join(sorted(schema)) or "none"
        raise TypeError(f"codec {codec!r} takes no parameter {', '.join(unknown)} (accepted: {accepted})")
    out: dict[str, Any] = {}
    for key, (kind, default) in schema.items():
        value = given.get(key, default)
        if value is None and default is None:
            out[key] = None
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"codec {codec!r}: parameter {key} must be {kind.__name__}, got {value!r}")
        out[key] = value
    return out


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` (decoders validate what came off the wire)."""
    if not condition:
        raise ValueError(message)


class DeviceRng:
    """Torch generators, one per device, all seeded from one ``seed`` (a random one when ``None``)."""

    def __init__(self, seed: int | None) -> None:
        self.seed = secrets.randbits(62) if seed is None else int(seed)
        self._gens: dict[torch.device, torch.Generator] = {}

    def on(self, device: torch.device) -> torch.Generator:
        """The generator that draws on ``device``."""
        gen = self._gens.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._gens[device] = gen
        return gen

    def draw_seed(self) -> int:
        """A fresh 62-bit int for a per-call seed (drawn on the host: no device sync)."""
        return int(torch.randint(0, 2**62, (1,), generator=self.on(torch.device("cpu"))).item())


def flat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous 1-D tensor (a view when it already is contiguous)."""
    return tensor.reshape(-1).contiguous()


def saturate_to(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast a float32 result this decoder owns to ``dtype``, clamping in place to ``dtype``'s finite range first
    (an unbiased estimate may exceed the input's range: float16 would turn it into inf)."""
    if dtype.is_floating_point and torch.finfo(dtype).max < torch.finfo(tensor.dtype).max:
        limit = torch.finfo(dtype).max
        tensor = tensor.clamp_(-limit, limit)
    return tensor.to(dtype)


def fresh(tensor: torch.Tensor, source: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``tensor`` converted to ``dtype`` on ``device``, copied if it would still share memory with ``source``."""
    out = tensor.to(device=device, dtype=dtype)
    if out.numel() and out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr():
        out = out.clone()
    return out
