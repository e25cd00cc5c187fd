"""Sparsifying codecs: send only some elements.

``topk`` (the k largest magnitudes), ``randomk`` (k random elements, indices regenerated from a seed, unbiased),
``dgc`` (Deep Gradient Compression, Lin et al. 2018: top-k of a locally accumulated, momentum-corrected
gradient), ``topk_adam`` (top-k of locally accumulated Adam directions) and ``nonzero`` (every non-zero element:
lossless, for changes that are sparse by construction). Decoding scatters into zeros, so a decoded tensor is dense.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .base import Codec, DeviceRng, Encoded, check, flat, resolve_params, saturate_to
from .registry import register_codec

_EXACT_BELOW = 1 << 16  # below this many elements torch.topk is cheap enough
_SAMPLE_HITS = 1000  # sample size is chosen so that about this many sampled elements clear the threshold
_MIN_SAMPLE = 4096
_OVERSHOOT = 1.15  # aim the sampled threshold at 15% more candidates than k
_M32 = 0xFFFFFFFF
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)  # numpy selects from these in place (others: a cast)


# ---- selection and (de)scattering --------------------------------------------------------------------------


def _count(ratio: float, numel: int) -> int:
    """How many elements a density ``ratio`` keeps: at least one of a non-empty tensor."""
    if numel == 0:
        return 0
    return max(1, min(numel, int(ratio * numel + 1e-9)))


def topk_indices(magnitude: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Positions (int64, ascending) of the ``k`` largest entries of 1-D non-negative ``magnitude``: exactly the
    top-k, ties broken arbitrarily.

    On the CPU, numpy's introselect (``np.argpartition``, linear time) picks them: several times cheaper than
    ``torch.topk`` there. On other devices, :func:`sampled_topk_indices` for large inputs, else ``torch.topk``.
    """
    n = magnitude.numel()
    if k >= n:
        return torch.arange(n, device=magnitude.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=magnitude.device)
    if magnitude.device.type == "cpu":
        values = magnitude.detach()
        picked = np.argpartition((values if values.dtype in _NUMPY_FLOATS else values.float()).numpy(), n - k)[n - k :]
        picked.sort()
        return torch.from_numpy(picked.astype(np.int64, copy=False))
    if n >= _EXACT_BELOW and k * 8 <= n:
        return sampled_topk_indices(magnitude, k, gen)
    return torch.topk(magnitude, k, sorted=False).indices.sort().values


def sampled_topk_indices(magnitude: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """:func:`topk_indices` without a sort or ``torch.topk``'s full selection (for ``0 < k < n``): the k-th largest
    value is estimated from a random sample (aimed a little low), the elements above it are gathered with one mask,
    and ``torch.topk`` runs only over those candidates. Since every non-candidate is below every candidate, the
    result is exact; when the estimate was too high (fewer than k candidates) it retries lower, then falls back to
    ``torch.topk``."""
    n = magnitude.numel()
    m = min(n, max(_MIN_SAMPLE, _SAMPLE_HITS * n // k))
    sample = magnitude[torch.randint(0, n, (m,), generator=gen, device=magnitude.device)]
    over = _OVERSHOOT
    for _ in range(3):
        target = min(m, math.ceil(over * k * m / n))
        threshold = torch.kthvalue(sample, m - target + 1).values
        candidates = (magnitude >= threshold).nonzero().squeeze(1)
        if candidates.numel() >= k:
            pick = torch.topk(magnitude[candidates], k, sorted=False).indices
            return candidates[pick].sort().values
        over *= 4
    return torch.topk(magnitude, k, sorted=False).indices.sort().values


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def _sparse_parts(codec: str, encoded: Encoded, k: int, numel: int,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``buffers = [values, indices]`` (``k`` of each) checked, the indices on ``device`` and within ``numel``."""
    check(len(encoded.buffers) == 2, f"codec {codec!r}: expected 2 buffers, got {len(encoded.buffers)}")
    values, indices = encoded.buffers
    check(values.dim() == 1 and indices.dim() == 1 and values.numel() == indices.numel() == k,
          f"codec {codec!r}: expected {k} values and indices for {numel} elements, "
          f"got {values.numel()} and {indices.numel()}")
    check(indices.dtype in (torch.int32, torch.int64),
          f"codec {codec!r}: indices must be int32 or int64, got {indices.dtype}")
    if indices.numel():
        indices = indices.to(device)
        low, high = torch.aminmax(indices)
        check(int(low) >= 0 and int(high) < numel, f"codec {codec!r}: indices out of range [0, {numel})")
    return values, indices


def _sparse_decode(codec: str, encoded: Encoded, k: int, numel: int, dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor:
    """Scatter ``buffers = [values, indices]`` (``k`` of each) into zeros."""
    out = torch.zeros(numel, dtype=dtype, device=device)
    values, indices = _sparse_parts(codec, encoded, k, numel, out.device)
    if indices.numel():
        out[indices] = values.to(device=out.device, dtype=dtype)
    return out


def _sparse_add(codec: str, encoded: Encoded, k: int, target: torch.Tensor, alpha: float) -> None:
    """``target += alpha * decoded`` touching only the ``k`` sent positions: what adding the dense decoded tensor
    computes, element for element (the sent positions are distinct: the scattered decode keeps one per position)."""
    values, indices = _sparse_parts(codec, encoded, k, target.numel(), target.device)
    if indices.numel():
        values = values.to(device=target.device, dtype=target.dtype)
        target.index_add_(0, indices, values if alpha == 1 else values * alpha)


def hashed_indices(seed: int, k: int, numel: int, device: torch.device | str) -> torch.Tensor:
    """``k`` uniform positions in ``[0, numel)`` (with replacement, int64), a pure function of the arguments.

    Counter-based hashing with integer torch ops, so the worker's device and the server's (CPU or CUDA) agree;
    ``torch.Generator`` streams differ between CPU and CUDA and could not be replayed across them.
    """
    s1, s2 = seed & _M32, (seed >> 32) & _M32
    h = torch.arange(2 * k, dtype=torch.int64, device=device).add_(s1).bitwise_and_(_M32)
    h = _mix32(_mix32(h).bitwise_xor_(s2)).view(k, 2)
    wide = (h[:, 0] << 30) | (h[:, 1] >> 2)  # 62 random bits: the modulo bias is below numel / 2**62
    return wide.remainder_(numel) if k else wide


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply) on int64 lanes holding values below 2**32; in place."""
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16).mul_(0x45D9F3B).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _ratio(codec: str, value: float) -> float:
    check(0.0 < value <= 1.0, f"codec {codec!r}: ratio must be in (0, 1], got {value}")
    return value


# ---- codecs ------------------------------------------------------------------------------------------------


@register_codec
class TopKCodec(Codec):
    """The ``k = ratio * numel`` largest-magnitude elements (exactly k; see :func:`topk_indices`).

    Params: ``ratio`` (default 0.01), ``seed`` (for the threshold sample only: the result does not depend on it).
    Buffers: values (the input's dtype) and ascending indices (int32; int64 beyond 2**31 elements). Meta: none.
    Biased: pair it with error feedback.
    """

    name = "topk"
    copies = True
    SCHEMA = {"ratio": (float, 0.01), "seed": (int, None)}

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.ratio = _ratio(self.name, self.params["ratio"])
        self.rng = DeviceRng(self.params["seed"])

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor)
        idx = topk_indices(x.abs(), _count(self.ratio, x.numel()), self.rng.on(x.device))
        return Encoded({}, [x[idx], idx.to(_index_dtype(x.numel()))])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return _sparse_decode(self.name, encoded, _count(self.ratio, numel), numel, dtype, device)

    def add_decoded_(self, target: torch.Tensor, encoded: Encoded, alpha: float = 1.0) -> None:
        _sparse_add(self.name, encoded, _count(self.ratio, target.numel()), target, alpha)


@register_codec
class RandomKCodec(Codec):
    """``k = ratio * numel`` positions drawn uniformly (with replacement) from a per-call seed sent in meta, so
    only the values cross the wire. Decoding sums the values into their positions scaled by ``numel / k``, which
    makes it unbiased; ``scale=false`` leaves them unscaled (biased, but a contraction: the form to use with
    error feedback, whose residual the scaled form inflates).

    Params: ``ratio`` (default 0.01), ``scale`` (default true), ``seed``. Buffers: values (the input's dtype).
    Meta: ``seed`` (int; positions are :func:`hashed_indices` of it), ``scale`` (bool).
    """

    name = "randomk"
    unbiased = True
    SCHEMA = {"ratio": (float, 0.01), "scale": (bool, True), "seed": (int, None)}

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.ratio = _ratio(self.name, self.params["ratio"])
        self.scale: bool = self.params["scale"]
        self.unbiased = self.scale  # type: ignore[misc]
        self.rng = DeviceRng(self.params["seed"])

    def feedback_problem(self) -> str | None:
        # k draws with replacement, each scaled by numel / k: the error's variance is (numel - 1) / k x the input's
        if self.scale and self.ratio < 1:
            return (f"randomk scaled by numel / k (unbiased) at ratio {self.ratio} adds noise of about 1 / ratio times "
                    "the input; error feedback around it diverges: use scale=false (a contraction)")
        return None

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor)
        seed = self.rng.draw_seed()
        idx = hashed_indices(seed, _count(self.ratio, x.numel()), x.numel(), x.device)
        return Encoded({"seed": seed, "scale": self.scale}, [x[idx]])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        check(len(encoded.buffers) == 1, f"codec 'randomk': expected 1 buffer, got {len(encoded.buffers)}")
        (values,) = encoded.buffers
        seed: Any = encoded.meta.get("seed")
        scale: Any = encoded.meta.get("scale", True)
        check(isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63,
              f"codec 'randomk': meta 'seed' must be a non-negative int, got {seed!r}")
        check(isinstance(scale, bool), f"codec 'randomk': meta 'scale' must be a bool, got {scale!r}")
        k = _count(self.ratio, numel)
        check(values.dim() == 1 and values.numel() == k,
              f"codec 'randomk': expected {k} values for {numel} elements at ratio {self.ratio}, got {values.numel()}")
        out = torch.zeros(numel, dtype=torch.float32, device=device)
        if k:
            values = values.to(device=out.device, dtype=torch.float32)
            if scale:
                values = values * (numel / k)
            out.index_add_(0, hashed_indices(seed, k, numel, out.device), values)
        return saturate_to(out, dtype)


@register_codec
class DgcCodec(Codec):
    """Deep Gradient Compression (Lin et al. 2018), the worker side; stateful.

    Each call: clip the gradient's L2 norm to ``clip`` (if set); momentum correction ``u = momentum * u + g``;
    local accumulation ``v += u``; send the top-k of ``|v|`` (threshold estimated from a sample, see
    :func:`topk_indices`); clear the sent positions of ``v`` and ``u`` (momentum factor masking). The density
    warms up: it decays exponentially from 25% to ``ratio`` over the first ``warmup_steps`` calls.

    The decoded tensor already contains momentum: the server should apply it with momentum-free SGD.

    Params: ``ratio`` (final density, default 0.001), ``momentum`` (0.9), ``clip`` (optional max norm),
    ``warmup_steps`` (0), ``seed``. Buffers and decoding as ``topk``. Meta: ``step``, ``density``.
    """

    name = "dgc"
    stateful = True
    copies = True
    SCHEMA = {"ratio": (float, 0.001), "momentum": (float, 0.9), "clip": (float, None),
              "warmup_steps": (int, 0), "seed": (int, None)}
    WARMUP_START = 0.25

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.ratio = _ratio(self.name, self.params["ratio"])
        self.momentum: float = self.params["momentum"]
        self.clip: float | None = self.params["clip"]
        self.warmup_steps: int = self.params["warmup_steps"]
        check(0.0 <= self.momentum < 1.0, f"codec 'dgc': momentum must be in [0, 1), got {self.momentum}")
        check(self.clip is None or self.clip > 0, f"codec 'dgc': clip must be > 0, got {self.clip}")
        check(self.warmup_steps >= 0, f"codec 'dgc': warmup_steps must be >= 0, got {self.warmup_steps}")
        self.rng = DeviceRng(self.params["seed"])
        self.step = 0
        self.u: torch.Tensor | None = None  # momentum
        self.v: torch.Tensor | None = None  # accumulated, not yet sent

    def density(self, step: int) -> float:
        """The fraction of elements sent at ``step`` (0-based)."""
        start = max(self.WARMUP_START, self.ratio)
        if step >= self.warmup_steps:
            return self.ratio
        return start * (self.ratio / start) ** (step / self.warmup_steps)

    def _state(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.u is None or self.v is None:
            self.u, self.v = torch.zeros_like(g), torch.zeros_like(g)
        elif self.v.shape != g.shape or self.v.device != g.device:
            raise ValueError(f"codec 'dgc' holds state for {self.v.numel()} elements on {self.v.device}, got "
                             f"{g.numel()} on {g.device}; use one instance per key")
        return self.u, self.v

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor)
        g = x.float()
        if self.clip is not None:
            g = g * (self.clip / (torch.linalg.vector_norm(g) + 1e-12)).clamp(max=1.0)
        u, v = self._state(g)
        u.mul_(self.momentum).add_(g)
        v.add_(u)
        density = self.density(self.step)
        idx = topk_indices(v.abs(), _count(density, v.numel()), self.rng.on(v.device))
        values = v[idx].to(x.dtype)
        v[idx] -= values.float()  # zero for float32; keeps what a narrower dtype rounded off
        u[idx] = 0.0
        meta = {"step": self.step, "density": density}
        self.step += 1
        return Encoded(meta, [values, idx.to(_index_dtype(v.numel()))])

    @staticmethod
    def _density(encoded: Encoded) -> float:
        density: Any = encoded.meta.get("density")
        check(isinstance(density, float) and 0.0 < density <= 1.0,
              f"codec 'dgc': meta 'density' must be a float in (0, 1], got {density!r}")
        return density

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return _sparse_decode(self.name, encoded, _count(self._density(encoded), numel), numel, dtype, device)

    def add_decoded_(self, target: torch.Tensor, encoded: Encoded, alpha: float = 1.0) -> None:
        _sparse_add(self.name, encoded, _count(self._density(encoded), target.numel()), target, alpha)

    def reset(self) -> None:
        """Forget momentum, accumulation and the warm-up position."""
        self.step, self.u, self.v = 0, None, None



@register_codec
class TopkAdamCodec(DgcCodec):
    """Top-k of locally accumulated Adam directions: DGC with Adam's moments in place of its momentum; stateful.

    Adam on the servers normalises each coordinate's step, so a sparsified gradient whose unsent mass waits in an
    error-feedback residual is applied at a fraction of its size (a coordinate sent once in many steps moves as far
    as one sent every step). This codec moves Adam to the workers, as DGC moves momentum: each call updates
    Adam's moments of the gradient (``m = beta1 m + (1 - beta1) g``, ``s = beta2 s + (1 - beta2) g^2``, bias
    corrected), accumulates the direction ``v += m / (sqrt(s) + eps)`` and sends the top-k of ``|v|`` (clearing
    what it sent: error feedback). The density warms up as DGC's. With ``ratio=1`` the servers' SGD applies the
    average of the workers' Adam directions every step.

    The decoded tensor is already an update direction: the servers run momentum-free SGD with Adam's learning rate
    (``--optimizer sgd:lr=0.002``). Params: ``ratio`` (0.01), ``beta1`` (0.9), ``beta2`` (0.999), ``eps`` (1e-8),
    ``warmup_steps`` (0), ``seed``. Buffers and decoding as ``topk``. Meta: ``step``, ``density``.
    """

    name = "topk_adam"
    SCHEMA = {"ratio": (float, 0.01), "beta1": (float, 0.9), "beta2": (float, 0.999), "eps": (float, 1e-8),
              "warmup_steps": (int, 0), "seed": (int, None)}

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.ratio = _ratio(self.name, self.params["ratio"])
        self.beta1: float = self.params["beta1"]
        self.beta2: float = self.params["beta2"]
        self.eps: float = self.params["eps"]
        self.warmup_steps = self.params["warmup_steps"]
        for name in ("beta1", "beta2"):
            check(0.0 <= self.params[name] < 1.0, f"codec 'topk_adam': {name} must be in [0, 1), got "
                                                  f"{self.params[name]}")
        check(self.eps > 0, f"codec 'topk_adam': eps must be > 0, got {self.eps}")
        check(self.warmup_steps >= 0, f"codec 'topk_adam': warmup_steps must be >= 0, got {self.warmup_steps}")
        self.rng = DeviceRng(self.params["seed"])
        self.step = 0
        self.u: torch.Tensor | None = None  # Adam's first moment
        self.v: torch.Tensor | None = None  # directions accumulated, not yet sent
        self.s: torch.Tensor | None = None  # Adam's second moment

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor)
        g = x.float()
        m, v = self._state(g)
        if self.s is None or self.s.shape != g.shape or self.s.device != g.device:
            self.s = torch.zeros_like(g)
        t = self.step + 1
        m.mul_(self.beta1).add_(g, alpha=1.0 - self.beta1)
        self.s.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
        denom = (self.s / (1.0 - self.beta2 ** t)).sqrt_().add_(self.eps)
        v.addcdiv_(m, denom, value=1.0 / (1.0 - self.beta1 ** t))
        density = self.density(self.step)
        idx = topk_indices(v.abs(), _count(density, v.numel()), self.rng.on(v.device))
        values = v[idx].to(x.dtype)
        v[idx] -= values.float()  # zero for float32; keeps what a narrower dtype rounded off
        meta = {"step": self.step, "density": density}
        self.step += 1
        return Encoded(meta, [values, idx.to(_index_dtype(v.numel()))])

    def reset(self) -> None:
        """Forget the moments, the accumulation and the warm-up position."""
        super().reset()
        self.s = None


@register_codec
class NonzeroCodec(Codec):
    """Exactly the non-zero elements, with their positions (lossless), or the raw tensor where that is smaller.

    For a change that is sparse by construction: the pull of servers running momentum-free SGD on top-k updates
    (only the positions some worker sent moved since the last pull), which top-k would cut and int8 would send
    whole. Lossless after its warm-up on purpose: a lossy form leaves the servers' pull error feedback a dense
    residual, and every later change would be dense.

    Params: ``warmup`` (default 0): the first N tensors go as int8, while the workers' updates are still dense
    (a sparsifier's own warm-up, e.g. ``topk_adam:warmup_steps=10``); the servers' pull error feedback keeps what
    int8 drops, and the first exact change after them carries it. Buffers: values (the input's dtype) and
    ascending indices (int32; int64 beyond 2**31 elements); or the raw values; or int8's. Meta: ``form``
    (``sparse``, ``raw`` or ``int8``), and int8's meta as ``m``.
    """

    name = "nonzero"
    exact = True
    copies = True
    SCHEMA = {"warmup": (int, 0)}

    def __init__(self, **params: Any) -> None:
        from .registry import make_codec  # (the registry imports this module)

        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.warmup: int = self.params["warmup"]
        check(self.warmup >= 0, f"codec 'nonzero': warmup must be >= 0, got {self.warmup}")
        self.exact = self.warmup == 0  # type: ignore[misc]
        self.stateful = self.warmup > 0  # type: ignore[misc]
        self.calls = 0
        self._int8 = make_codec("int8")

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor)
        self.calls += 1
        if self.calls <= self.warmup:
            encoded = self._int8.encode(x)
            return Encoded({"form": "int8", "m": encoded.meta}, encoded.buffers)
        idx = x.nonzero().squeeze(1)
        if idx.numel() * (x.element_size() + 4) >= x.numel() * x.element_size():
            return Encoded({"form": "raw"}, [x.clone()])
        return Encoded({"form": "sparse"}, [x[idx], idx.to(_index_dtype(x.numel()))])

    def _checked(self, encoded: Encoded, numel: int) -> tuple[str, Encoded]:
        """The form of ``encoded`` and what its codec decodes (int8's own meta), the buffers checked."""
        form: Any = encoded.meta.get("form")
        check(form in ("sparse", "raw", "int8"), f"codec 'nonzero': meta 'form' must be sparse, raw or int8, got "
                                                 f"{str(form)[:40]!r}")
        if form == "int8":
            meta: Any = encoded.meta.get("m")
            check(isinstance(meta, dict), "codec 'nonzero': meta 'm' (int8's) must be a map")
            return form, Encoded(meta, encoded.buffers)
        check(len(encoded.buffers) == (1 if form == "raw" else 2) and encoded.buffers[0].dim() == 1,
              f"codec 'nonzero': expected {1 if form == 'raw' else 2} 1-D buffers, got {len(encoded.buffers)}")
        k = encoded.buffers[0].numel()
        check(k == numel if form == "raw" else k <= numel,
              f"codec 'nonzero': expected {'exactly' if form == 'raw' else 'at most'} {numel} values, got {k}")
        return form, encoded

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        form, inner = self._checked(encoded, numel)
        if form == "int8":
            return self._int8.decode(inner, numel, dtype, device)
        if form == "raw":
            return saturate_to(encoded.buffers[0].to(device=device, copy=True), dtype)
        return _sparse_decode(self.name, encoded, encoded.buffers[0].numel(), numel, dtype, device)

    def add_decoded_(self, target: torch.Tensor, encoded: Encoded, alpha: float = 1.0) -> None:
        form, inner = self._checked(encoded, target.numel())
        if form == "sparse":
            _sparse_add(self.name, encoded, encoded.buffers[0].numel(), target, alpha)
        elif form == "int8":
            self._int8.add_decoded_(target, inner, alpha)
        else:
            super().add_decoded_(target, encoded, alpha)
