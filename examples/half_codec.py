"""A user codec in ten lines: float16 with a per-tensor scale. Use it with
`PYTHONPATH=. zps run --codec examples.half_codec:ScaledHalf examples/digits.py`."""

import torch

from zps.protocol.codecs import Codec, Encoded


class ScaledHalf(Codec):
    name = "scaled_half"

    def encode(self, tensor: torch.Tensor) -> Encoded:
        x = tensor.reshape(-1).float()
        scale = x.abs().max().clamp(min=1e-30) if x.numel() else torch.tensor(1.0)
        return Encoded({"scale": float(scale)}, [(x / scale).half()])

    def decode(self, encoded: Encoded, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        return (encoded.buffers[0].to(device).float() * encoded.meta["scale"]).to(dtype)
