"""Low-rank compression: PowerSGD (Vogels et al. 2019) in its one-round form.

PowerSGD proper runs two all-reduce rounds per step (P, then Q computed from the *averaged* P), so every worker
shares one basis and the low-rank factors can be summed without decoding. A parameter-server push is a single
message, so this codec runs the whole power-iteration step locally and sends both factors at once:

    P = M Q_warm;  P = orthonormal basis of P (QR);  Q = M^T P;  send P, Q;  decode M ~ P Q^T

``Q`` is kept on ``self`` as the next call's warm start, so repeated pushes of a slowly changing gradient refine
the subspace over steps. Each worker's factors span its own subspace: the server decodes each push to a dense
tensor before summing. Biased: pair it with error feedback, as the paper does.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import Codec, DeviceRng, Encoded, check, flat, fresh, resolve_params, saturate_to
from .registry import register_codec


def matrix_shape(tensor: torch.Tensor, rank: int) -> tuple[int, int] | None:
    """The (rows, cols) the codec views ``tensor`` as, or ``None`` when rank-``rank`` factors would not be smaller.

    A tensor of 2 or more dimensions keeps ``(shape[0], numel / shape[0])`` when that is worth it; otherwise
    (1-D chunks, degenerate shapes) the most square exact factorisation not thinner than 1:4, or else
    ``ceil(sqrt(n))`` rows with the last row zero-padded.
    """
    n = tensor.numel()

    def worth(rows: int, cols: int) -> bool:
        return min(rows, cols) > rank and rank * (rows + cols) < n

    if tensor.dim() >= 2 and worth(tensor.shape[0], n // max(1, tensor.shape[0])):
        return tensor.shape[0], n // tensor.shape[0]
    side = math.isqrt(n)
    for rows in range(side, max(1, side // 2), -1):
        if n % rows == 0:
            return (rows, n // rows) if worth(rows, n // rows) else None
    rows = side + (side * side < n)
    cols = -(-n // max(1, rows))
    return (rows, cols) if worth(rows, cols) else None


@register_codec
class PowerSgdCodec(Codec):
    """Rank-``rank`` approximation by one warm-started power-iteration step (see the module docstring); stateful.

    Params: ``rank`` (default 2), ``seed`` (for the initial Q). Buffers: P (rows x rank) and Q (cols x rank),
    float32, row-major and flattened. Meta: ``raw`` (bool), ``rows``, ``cols``, ``rank``. Tensors too small to
    gain are sent raw: one buffer, the tensor itself, ``raw`` true.
    """

    name = "powersgd"
    stateful = True
    SCHEMA = {"rank": (int, 2), "seed": (int, None)}

    def __init__(self, **params: Any) -> None:
        self.params = resolve_params(self.name, params, self.SCHEMA)
        self.rank: int = self.params["rank"]
        check(self.rank >= 1, f"codec 'powersgd': rank must be >= 1, got {self.rank}")
        self.rng = DeviceRng(self.params["seed"])
        self.q: torch.Tensor | None = None  # warm start, cols x rank
        self.q0: torch.Tensor | None = None  # the random start, reused for columns that collapse to zero

    def _warm_q(self, cols: int, device: torch.device) -> torch.Tensor:
        if self.q is None or self.q.shape[0] != cols or self.q.device != device:
            self.q0 = torch.randn(cols, self.rank, generator=self.rng.on(device), device=device)
            self.q = self.q0
        return self.q

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor)
        shape = matrix_shape(tensor, self.rank)
        if shape is None:
            return Encoded({"raw": True}, [x])
        rows, cols = shape
        m = x.float()
        if rows * cols != m.numel():
            m = torch.cat([m, m.new_zeros(rows * cols - m.numel())])
        m = m.view(rows, cols)
        p = torch.linalg.qr(m @ self._warm_q(cols, x.device), mode="reduced").Q
        q = (p.t() @ m).t()  # = M^T P; this order reads M row-major, several times faster than m.t() @ p
        alive = torch.linalg.vector_norm(q, dim=0) > 0  # a zero column would stay zero forever: restart it
        assert self.q0 is not None  # set by _warm_q
        self.q = torch.where(alive, q, self.q0)
        meta = {"raw": False, "rows": rows, "cols": cols, "rank": self.rank}
        return Encoded(meta, [p.contiguous().view(-1), q.contiguous().view(-1)])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        meta = encoded.meta
        if meta.get("raw"):
            check(len(encoded.buffers) == 1 and encoded.buffers[0].numel() == numel,
                  f"codec 'powersgd': a raw tensor needs one buffer of {numel} elements")
            return fresh(encoded.buffers[0], encoded.buffers[0], dtype, device)
        rows: Any = meta.get("rows")
        cols: Any = meta.get("cols")
        rank: Any = meta.get("rank")
        check(all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (rows, cols, rank)),
              f"codec 'powersgd': meta rows, cols, rank must be positive ints, got {rows!r}, {cols!r}, {rank!r}")
        check(numel <= rows * cols < numel + max(rows, cols),
              f"codec 'powersgd': a {rows} x {cols} matrix does not hold {numel} elements")
        check(len(encoded.buffers) == 2, f"codec 'powersgd': expected 2 buffers, got {len(encoded.buffers)}")
        p, q = encoded.buffers
        check(p.numel() == rows * rank and q.numel() == cols * rank,
              f"codec 'powersgd': factor sizes {p.numel()}, {q.numel()} do not match {rows} x {cols} at rank {rank}")
        p = p.to(device=device, dtype=torch.float32).view(rows, rank)
        q = q.to(device=device, dtype=torch.float32).view(cols, rank)
        return saturate_to((p @ q.t()).view(-1)[:numel], dtype)
