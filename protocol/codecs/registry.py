"""The codec registry: codecs by name, specs (``name:k=v,...``) parsed and built, user codecs by import path.

A spec is ``name`` or ``name:k=v,k=v`` (``topk:ratio=0.01``). A name containing a ``.`` is an import path to a
:class:`Codec` subclass: ``package.module:ClassName`` or ``package.module:ClassName:k=v,...``. Values are parsed
as bool (``true``/``false``), ``none``, int, float, then string.

Importing by path runs that module's code: a server building decoders from specs that came off the network
should pass ``allow_import=False`` and accept only registered names (or paths it was configured with).
"""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from .base import Codec
from .feedback import ErrorFeedback

_REGISTRY: dict[str, type[Codec]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class CodecSpecError(ValueError):
    """A codec spec names no codec, has malformed or rejected parameters, or a path that is not a Codec."""


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register ``cls`` under ``cls.name`` (usable as a class decorator). A name taken by another class raises."""
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise TypeError(f"register_codec expects a Codec subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"codec class {cls.__qualname__} has an invalid name {name!r} (lowercase letters, digits, _)")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(
            f"codec name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
            f"refusing {cls.__module__}.{cls.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def available_codecs() -> list[str]:
    """The registered codec names, sorted."""
    return sorted(_REGISTRY)


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_params(spec: str, text: str) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if not text.strip():
        return params
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise CodecSpecError(f"codec spec {spec!r}: parameter {item.strip()!r} is not key=value")
        if key in params:
            raise CodecSpecError(f"codec spec {spec!r}: parameter {key!r} given twice")
        params[key] = _parse_value(value)
    return params


def parse_codec_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``spec`` into its name (or ``module:Class`` path) and its parsed parameters."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecSpecError(f"codec spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    head, _, rest = spec.partition(":")
    if "." in head:  # package.module:ClassName[:params]
        cls_name, _, param_text = rest.partition(":")
        if not cls_name.strip():
            raise CodecSpecError(f"codec spec {spec!r}: an import path needs a class, as in 'package.module:ClassName'")
        return f"{head.strip()}:{cls_name.strip()}", _parse_params(spec, param_text)
    return head.strip(), _parse_params(spec, rest)


def _load_class(path: str, spec: str) -> type[Codec]:
    module_name, _, cls_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CodecSpecError(f"codec spec {spec!r}: cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in cls_name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise CodecSpecError(f"codec spec {spec!r}: module {module_name!r} has no attribute {cls_name!r}")
    if not (isinstance(obj, type) and issubclass(obj, Codec)):
        raise CodecSpecError(f"codec spec {spec!r}: {path} is {obj!r}, not a Codec subclass")
    return obj


def _resolve(spec: str, allow_import: bool) -> tuple[type[Codec], dict[str, Any], str | None]:
    """The class, parameters and (for import paths) spec name that ``spec`` describes."""
    name, params = parse_codec_spec(spec)
    if ":" in name:
        if not allow_import:
            raise CodecSpecError(f"codec spec {spec!r}: import paths are not allowed here; use one of "
                                 f"{', '.join(available_codecs())}")
        return _load_class(name, spec), params, name
    cls = _REGISTRY.get(name)
    if cls is None:
        raise CodecSpecError(f"unknown codec {name!r} in spec {spec!r}; available: {', '.join(available_codecs())} "
                             "(or a 'package.module:ClassName' import path)")
    return cls, params, None


def _build(cls: type[Codec], params: dict[str, Any], spec_name: str | None, spec: str) -> Codec:
    try:
        codec = cls(**params)
    except (TypeError, ValueError) as exc:
        raise CodecSpecError(f"codec spec {spec!r}: bad parameters: {exc}") from exc
    if spec_name is not None:
        codec._spec_name = spec_name  # type: ignore[attr-defined]  # so codec.spec() names the path back
        codec.__dict__.pop("_spec", None)
    return codec


def codec_factory(spec: str, *, error_feedback: bool = False, allow_import: bool = True) -> Callable[[], Codec]:
    """Validate ``spec`` once (building one instance) and return a cheap builder of fresh instances."""
    cls, params, spec_name = _resolve(spec, allow_import)
    _build(cls, params, spec_name, spec)

    def build() -> Codec:
        codec = _build(cls, params, spec_name, spec)
        return ErrorFeedback(codec) if error_feedback else codec

    return build


def make_codec(spec: str, *, error_feedback: bool = False, allow_import: bool = True) -> Codec:
    """A fresh codec built from ``spec``; wrapped in :class:`ErrorFeedback` when ``error_feedback``."""
    cls, params, spec_name = _resolve(spec, allow_import)
    codec = _build(cls, params, spec_name, spec)
    return ErrorFeedback(codec) if error_feedback else codec


def canonical_spec(spec: str, *, allow_import: bool = True) -> str:
    """The one spelling of ``spec``: its name and every parameter, defaults included (``int8`` ->
    ``int8:chunk=4096``). Specs are compared only in this form, wherever they come from."""
    return make_codec(spec, allow_import=allow_import).spec()
