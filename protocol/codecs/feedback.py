"""Error feedback: a wrapper that makes any lossy codec conserve gradient mass over time.

Each ``encode`` sends ``x + residual`` and keeps what its codec lost, ``residual = (x + residual) - decoded``, so
the sum of everything decoded plus the final residual equals the sum of every gradient pushed (Seide et al. 2014,
Karimireddy et al. 2019). The residual is a float32 tensor on the gradient's device.

Learning-rate convention: the residual is stored in gradient units. A gradient ``g`` becomes the parameter update
``-lr * g`` on the server, so when the learning rate changes from ``a`` to ``b`` (:meth:`ErrorFeedback.set_lr`)
the residual is scaled by ``a / b``: the parameter-space correction it still owes, ``a * residual``, is kept.

``residual`` is the wrapper's own buffer, reused by later calls (no allocation per step): clone it to keep it.
"""
from __future__ import annotations

import torch

from .base import Codec, Encoded, flat


class ErrorFeedback(Codec):
    """Wrap ``inner`` with a residual kept on ``self``. Not a registered codec: ``spec()`` and ``decode`` are the
    inner codec's, so the receiver decodes with a plain instance of ``inner``'s spec."""

    stateful = True

    def __init__(self, inner: Codec, lr: float | None = None) -> None:
        if not isinstance(inner, Codec):
            raise TypeError(f"ErrorFeedback wraps a Codec, got {inner!r}")
        if isinstance(inner, ErrorFeedback):
            raise TypeError("ErrorFeedback would wrap another ErrorFeedback: one residual is enough")
        problem = inner.feedback_problem()
        if problem:
            raise ValueError(f"error feedback around codec {inner.spec()!r} would not converge: {problem}")
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]  # the wrapper speaks for its codec
        self.exact = inner.exact  # type: ignore[misc]
        self.lr = lr
        self.residual: torch.Tensor | None = None
        self._spare: torch.Tensor | None = None  # a float32 buffer of the residual's size, reused every call

    @property
    def params(self) -> dict:
        return getattr(self.inner, "params", {})

    def spec(self) -> str:
        return self.inner.spec()

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = flat(tensor)
        residual = self.residual
        if residual is None:
            compensated = x.to(torch.float32, copy=True)
        else:
            if residual.shape != x.shape or residual.device != x.device:
                raise ValueError(f"error feedback for codec {self.inner.name!r}: got {x.numel()} elements on "
                                 f"{x.device}, the residual holds {residual.numel()} on {residual.device}; use one "
                                 "ErrorFeedback per key")
            spare = self._spare
            if (spare is None or spare is residual or spare.shape != residual.shape or spare.device != residual.device
                    or spare.dtype != torch.float32):
                spare = torch.empty_like(residual, dtype=torch.float32)
            compensated = torch.add(x, residual, out=spare)  # x + residual, into the residual before this one
        encoded = self.inner.encode(compensated.to(x.dtype))  # a no-op cast for float32 gradients
        # the cast to x.dtype (if any) and the codec's loss both land in the residual
        if self.inner.copies:  # no buffer views `compensated`: what is left of it in place is the residual
            self.inner.add_decoded_(compensated, encoded, alpha=-1)
            lost = compensated
        else:  # a buffer may view `compensated` (and go out as a frame later): leave it as it is
            lost = compensated - self.inner.decode(encoded, x.numel(), torch.float32, x.device)
        self._spare, self.residual = residual, lost  # the old residual is free: the next call computes into it
        return encoded

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        return self.inner.decode(encoded, numel, dtype, device)

    def set_lr(self, lr: float) -> None:
        """Record the learning rate; on a change from ``a`` to ``lr``, scale the residual by ``a / lr``."""
        if not lr > 0:
            raise ValueError(f"error feedback: learning rate must be > 0, got {lr!r}")
        if self.lr is not None and self.residual is not None and lr != self.lr:
            self.residual.mul_(self.lr / lr)
        self.lr = float(lr)

    def reset(self) -> None:
        """Forget the residual (e.g. after the model was reloaded from a checkpoint)."""
        self.residual = self._spare = None

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.inner.spec()!r})"
