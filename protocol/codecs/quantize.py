"""Quantizing codecs: every element is sent, in fewer bits.

``none`` (exact), ``fp16`` / ``bf16`` (casts), ``int8`` (per-chunk scale, round to nearest), ``qsgd`` (Alistarh et
al. 2017: stochastic, unbiased), ``terngrad`` (Wen et al. 2017: stochastic ternary, unbiased, 2 bits) and
``onebit`` (Seide et al. 2014: signs plus two means, biased; use it with error feedback). All arithmetic is in
float32 on the input's device; ``decode`` returns the requested dtype.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Codec, DeviceRng, Encoded, check, flat, fresh, resolve_params, saturate_to
from .registry import register_codec

_F16_MAX = float(torch.finfo(torch.float16).max)


# ---- shared helpers ----------------------------------------------------------------------------------------


def _n_buckets(numel: int, bucket: int) -> int:
    return -(-numel // bucket)


def _bucket_norms(x: torch.Tensor, bucket: int, order: float) -> torch.Tensor:
    """The L2 (``order=2``) or max-magnitude (``order=inf``) norm of each ``bucket``-sized slice of 1-D ``x``
    (the last slice may be short)."""
    n = x.numel()
    full = n - n % bucket
    views = ([x[:full].view(-1, bucket)] if full else []) + ([x[full:].view(1, -1)] if full < n else [])
    if not views:
        return x.new_zeros(0)
    if order == 2:
        parts = [torch.linalg.vector_norm(v, ord=2, dim=1) for v in views]
    else:  # max and -min: several times faster than vector_norm(ord=inf) on CPU
        parts = [torch.maximum(v.amax(dim=1), v.amin(dim=1).neg_()) for v in views]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _bucket_mul(x: torch.Tensor, factors: torch.Tensor, bucket: int, out: torch.Tensor) -> torch.Tensor:
    """``out = x * factors`` with one factor per ``bucket``-sized slice of 1-D float ``x`` (``out`` may be ``x``);
    no expanded copy of the factors."""
    n = x.numel()
    full = n - n % bucket
    if full:
        nf = full // bucket
        torch.mul(x[:full].view(nf, bucket), factors[:nf, None], out=out[:full].view(nf, bucket))
    if full < n:
        torch.mul(x[full:], factors[-1], out=out[full:])
    return out


def _stochastic_round_(y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Round float ``y`` in place to ``floor(y + u)``, ``u ~ U[0, 1)``: an unbiased integer, E = y."""
    noise = torch.rand(y.shape, generator=gen, device=y.device, dtype=y.dtype)
    return y.add_(noise).floor_()


def _pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 ``codes`` (each < 2**bits, bits in 1, 2, 4) into bytes, the first code in the low bits."""
    per = 8 // bits
    n = codes.numel()
    if n % per:
        codes = torch.cat([codes, codes.new_zeros(per - n % per)])
    lanes = codes.view(-1, per)
    packed = lanes[:, 0].clone()
    for j in range(1, per):
        packed |= lanes[:, j] << (bits * j)
    return packed


def _unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bits`: ``numel`` uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[:, None] >> shifts).bitwise_and_((1 << bits) - 1)
    return codes.view(-1)[:numel]


def _dequantize(codes: torch.Tensor, factors: torch.Tensor, bucket: int) -> torch.Tensor:
    """float32 ``codes * factor`` per bucket (converting first, then scaling in place, is the fast order)."""
    out = codes.to(torch.float32)
    return _bucket_mul(out, factors, bucket, out)


def _expect_buffers(encoded: Encoded, count: int, codec: str) -> list[torch.Tensor]:
    check(len(encoded.buffers) == count, f"codec {codec!r}: expected {count} buffers, got {len(encoded.buffers)}")
    return encoded.buffers


def _expect_numel(buf: torch.Tensor, numel: int, what: str) -> None:
    check(buf.dim() == 1 and buf.numel() == numel, f"{what}: expected a 1-D buffer of {numel}, got {tuple(buf.shape)}")


def _meta_int(meta: dict[str, Any], key: str, codec: str, low: int = 1) -> int:
    value: Any = meta.get(key)
    check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
          f"codec {codec!r}: meta {key!r} must be an int >= {low}, got {value!r}")
    return value


# ---- exact and casts ---------------------------------------------------------------------------------------


@register_codec
class NoneCodec(Codec):
    """No compression: the tensor itself is the one buffer (no copy when it is already contiguous)."""

    name = "none"
    exact = True

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, {})

    def encode(self, tensor: torch.Tensor) -> Encoded:
        return Encoded({}, [flat(tensor)])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        (buf,) = _expect_buffers(encoded, 1, self.name)
        _expect_numel(buf, numel, "none")
        return fresh(buf, buf, dtype, device)


class _CastCodec(Codec):
    """Send every element cast to ``wire_dtype``."""

    wire_dtype: torch.dtype = torch.float16

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, {})

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.wire_dtype)

    def encode(self, tensor: torch.Tensor) -> Encoded:
        return Encoded({}, [self._cast(flat(tensor))])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        (buf,) = _expect_buffers(encoded, 1, self.name)
        _expect_numel(buf, numel, self.name)
        return fresh(buf, buf, dtype, device)


@register_codec
class Fp16Codec(_CastCodec):
    """IEEE half precision, round to nearest; values beyond +-65504 (and infinities) saturate, NaN stays NaN."""

    name = "fp16"
    wire_dtype = torch.float16

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            return x
        return x.to(torch.float16).clamp_(-_F16_MAX, _F16_MAX)


@register_codec
class Bf16Codec(_CastCodec):
    """bfloat16 (float32's range, 8 bits of mantissa), round to nearest even."""

    name = "bf16"
    wire_dtype = torch.bfloat16


# ---- integer quantizers ------------------------------------------------------------------------------------


@register_codec
class Int8Codec(Codec):
    """Symmetric int8 with one float32 scale (max|x| / 127) per ``chunk`` elements, round to nearest.

    Buffers: ``q`` (int8, numel) and ``scale`` (float32, one per chunk). Meta: ``chunk``.
    The error per element is at most half its chunk's scale.
    """

    name = "int8"
    SCHEMA = {"chunk": (int, 4096)}

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.chunk: int = self.params["chunk"]
        check(self.chunk >= 1, f"codec 'int8': chunk must be >= 1, got {self.chunk}")

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor).float()
        amax = _bucket_norms(x, self.chunk, float("inf"))
        inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
        q = _bucket_mul(x, inv, self.chunk, torch.empty_like(x)).round_().clamp_(-127, 127)
        return Encoded({"chunk": self.chunk}, [q.to(torch.int8), amax / 127.0])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        q, scale = _expect_buffers(encoded, 2, self.name)
        chunk = _meta_int(encoded.meta, "chunk", self.name)
        _expect_numel(q, numel, "int8 values")
        _expect_numel(scale, _n_buckets(numel, chunk), "int8 scales")
        q, scale = q.to(device), scale.to(device=device, dtype=torch.float32)
        return _dequantize(q, scale, chunk).to(dtype)


@register_codec
class QsgdCodec(Codec):
    """QSGD (Alistarh et al. 2017): ``x_i ~ ||x||_2 * sign(x_i) * l_i / s`` with ``l_i`` the stochastic rounding
    of ``s * |x_i| / ||x||_2`` to an integer in ``[0, s]``: unbiased. Norms are taken per ``bucket`` elements
    (the paper's bucketing, which bounds the variance).

    Params: ``levels`` s (1..127, default 127), ``bucket`` (default 512), ``seed``. Buffers: the signed levels
    (int8; two 4-bit codes per byte when s <= 7) and the bucket norms (float32). Meta: ``levels``, ``bucket``,
    ``bits`` (4 or 8).
    """

    name = "qsgd"
    unbiased = True
    SCHEMA = {"levels": (int, 127), "bucket": (int, 512), "seed": (int, None)}

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.levels: int = self.params["levels"]
        self.bucket: int = self.params["bucket"]
        check(1 <= self.levels <= 127, f"codec 'qsgd': levels must be in 1..127, got {self.levels}")
        check(self.bucket >= 1, f"codec 'qsgd': bucket must be >= 1, got {self.bucket}")
        self.bits = 4 if self.levels <= 7 else 8
        self.rng = DeviceRng(self.params["seed"])

    def feedback_problem(self) -> str | None:
        # the paper's bound: E||Q(x) - x||^2 <= min(n / s^2, sqrt(n) / s) ||x||^2, n the bucket: >= 1 from s^2 <= n
        if self.bucket >= self.levels**2:
            return (f"qsgd with {self.levels} levels in buckets of {self.bucket} may lose more than it sends (variance "
                    f"bound {min(self.bucket / self.levels**2, self.bucket**0.5 / self.levels):.2g} x the input); "
                    f"error feedback around it can diverge: use buckets smaller than levels^2 = {self.levels**2}")
        return None

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor).float()
        norms = _bucket_norms(x, self.bucket, 2.0)
        factor = torch.where(norms > 0, self.levels / norms, torch.zeros_like(norms))
        y = _bucket_mul(x, factor, self.bucket, torch.empty_like(x))  # in [-s, s]
        q = _stochastic_round_(y, self.rng.on(x.device)).clamp_(-self.levels, self.levels).to(torch.int8)
        if self.bits == 4:
            q = _pack_bits((q + 8).view(torch.uint8), 4)
        meta = {"levels": self.levels, "bucket": self.bucket, "bits": self.bits}
        return Encoded(meta, [q, norms])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        q, norms = _expect_buffers(encoded, 2, self.name)
        levels = _meta_int(encoded.meta, "levels", self.name)
        bucket = _meta_int(encoded.meta, "bucket", self.name)
        bits = encoded.meta.get("bits")
        check(bits in (4, 8), f"codec 'qsgd': meta 'bits' must be 4 or 8, got {bits!r}")
        _expect_numel(q, numel if bits == 8 else -(-numel // 2), "qsgd levels")
        _expect_numel(norms, _n_buckets(numel, bucket), "qsgd norms")
        q, norms = q.to(device), norms.to(device=device, dtype=torch.float32)
        if bits == 4:
            q = _unpack_bits(q, 4, numel).view(torch.int8).sub_(8)
        return saturate_to(_dequantize(q, norms / levels, bucket), dtype)


@register_codec
class TernGradCodec(Codec):
    """TernGrad (Wen et al. 2017): ``x_i ~ s * sign(x_i) * b_i`` with ``b_i ~ Bernoulli(|x_i| / s)`` and
    ``s = max|x|``: unbiased, values in {-s, 0, s}, 2 bits per element, 4 per byte.

    Params: ``bucket`` (elements per scale; 0, the default, means one scale for the whole tensor), ``seed``.
    Buffers: packed trits (uint8, ceil(numel / 4); code = trit + 1, so 0 -> -1, 1 -> 0, 2 -> +1, the first
    element in the low bits) and the scales (float32). Meta: ``bucket`` (0 or the bucket size).
    """

    name = "terngrad"
    unbiased = True
    SCHEMA = {"bucket": (int, 0), "seed": (int, None)}

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.bucket: int = self.params["bucket"]
        check(self.bucket >= 0, f"codec 'terngrad': bucket must be >= 0, got {self.bucket}")
        self.rng = DeviceRng(self.params["seed"])

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor).float()
        bucket = self.bucket or max(1, x.numel())
        scale = _bucket_norms(x, bucket, float("inf"))
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        y = _bucket_mul(x, inv, bucket, torch.empty_like(x))  # in [-1, 1]
        codes = _stochastic_round_(y, self.rng.on(x.device)).clamp_(-1, 1).add_(1).to(torch.uint8)
        return Encoded({"bucket": self.bucket}, [_pack_bits(codes, 2), scale])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        packed, scale = _expect_buffers(encoded, 2, self.name)
        bucket = _meta_int(encoded.meta, "bucket", self.name, low=0) or max(1, numel)
        _expect_numel(packed, -(-numel // 4), "terngrad trits")
        _expect_numel(scale, _n_buckets(numel, bucket), "terngrad scales")
        packed, scale = packed.to(device), scale.to(device=device, dtype=torch.float32)
        trits = _unpack_bits(packed, 2, numel).view(torch.int8).sub_(1)
        return _dequantize(trits, scale, bucket).to(dtype)


@register_codec
class OneBitCodec(Codec):
    """1-bit quantization (Seide et al. 2014): the sign of each element, decoded as the mean of the non-negative
    elements or the mean of the negative ones (the two reconstruction values that minimise the squared error).
    Biased: pair it with error feedback.

    Buffers: packed signs (uint8, ceil(numel / 8); bit set = non-negative, the first element in bit 0) and
    ``[mean_pos, mean_neg]`` (float32). Meta: none.
    """

    name = "onebit"

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, {})

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor).float()
        positive = x >= 0
        counts = torch.stack([torch.count_nonzero(positive), x.numel() - torch.count_nonzero(positive)])
        total, magnitude = x.sum(), torch.linalg.vector_norm(x, ord=1)
        sums = torch.stack([total + magnitude, total - magnitude]) / 2  # [sum of x >= 0, sum of x < 0]
        means = (sums / counts.clamp(min=1)).to(torch.float32)  # an empty group's mean is 0
        return Encoded({}, [_pack_bits(positive.view(torch.uint8), 1), means])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        packed, means = _expect_buffers(encoded, 2, self.name)
        _expect_numel(packed, -(-numel // 8), "onebit signs")
        _expect_numel(means, 2, "onebit means")
        packed, means = packed.to(device), means.to(device=device, dtype=torch.float32)
        out = _unpack_bits(packed, 1, numel).to(torch.float32)  # 1 for x >= 0, else 0
        return out.mul_(means[0] - means[1]).add_(means[1]).to(dtype)
