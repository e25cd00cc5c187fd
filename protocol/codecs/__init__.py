"""Gradient compression: codecs by name (``make_codec("topk:ratio=0.01")``) and error feedback as a wrapper.

Registered codecs: ``none``, ``fp16``, ``bf16``, ``int8``, ``qsgd``, ``terngrad``, ``onebit`` (quantize),
``topk``, ``randomk``, ``dgc`` (sparse), ``powersgd`` (lowrank). User codecs load by import path
(``package.module:ClassName[:k=v,...]``) or register with :func:`register_codec`.
"""
from . import lowrank, quantize, sparse  # noqa: E402,F401  (importing them registers the built-in codecs)
from .base import Codec, Encoded
from .feedback import ErrorFeedback
from .registry import (
    CodecSpecError,
    available_codecs,
    canonical_spec,
    codec_factory,
    make_codec,
    parse_codec_spec,
    register_codec,
)

__all__ = [
    "Codec",
    "CodecSpecError",
    "Encoded",
    "ErrorFeedback",
    "available_codecs",
    "canonical_spec",
    "codec_factory",
    "make_codec",
    "parse_codec_spec",
    "register_codec",
]
