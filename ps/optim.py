"""Server-side optimizers: torch.optim's own classes, chosen by name and configured by validated hyper-parameters."""
from __future__ import annotations

import inspect
from typing import Any

import torch

from zps.protocol.bodies import MAX_LR
from zps.protocol.messages import ErrorCode, ProtocolError
from zps.protocol.optim_spec import IMPLEMENTATION_FLAGS as _IGNORED

# Element-wise optimizers give the same result on a chunk as on the whole tensor, so they may run on shards.
ALLOWED: dict[str, type[torch.optim.Optimizer]] = {
    cls.__name__.lower(): cls
    for cls in (
        torch.optim.SGD,
        torch.optim.Adam,
        torch.optim.AdamW,
        torch.optim.Adagrad,
        torch.optim.RMSprop,
        torch.optim.Adamax,
        torch.optim.NAdam,
        torch.optim.RAdam,
        torch.optim.Adadelta,
    )
}


def _bad(reason: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_OPTIMIZER, reason)


def optimizer_class(name: Any) -> type[torch.optim.Optimizer]:
    if not isinstance(name, str) or name.lower() not in ALLOWED:
        known = ", ".join(c.__name__ for c in ALLOWED.values())
        raise _bad(f"optimizer {name!r} is not available on the server (element-wise optimizers only): {known}")
    return ALLOWED[name.lower()]


def clean_hparams(cls: type[torch.optim.Optimizer], hparams: Any) -> dict[str, Any]:
    """Keep the hyper-parameters ``cls`` accepts; reject unknown names and non-numeric values by name."""
    if not isinstance(hparams, dict):
        raise _bad(f"hyper-parameters must be a map, got {type(hparams).__name__}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    derived = _derived_defaults(cls, frozenset(accepted))
    out: dict[str, Any] = {}
    for name, value in hparams.items():
        if name in _IGNORED or (name in derived and value == derived[name]):
            continue  # set by the class itself (e.g. AdamW's decoupled_weight_decay), not by its caller
        if name not in accepted:
            takes = ", ".join(sorted(accepted - _IGNORED))
            raise _bad(f"{cls.__name__} has no hyper-parameter {name!r}; it takes {takes}")
        if isinstance(value, list):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise _bad(f"{cls.__name__}.{name} must be numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        elif value is not None and not isinstance(value, (int, float, bool)):
            raise _bad(f"{cls.__name__}.{name} must be a number or boolean, got {value!r}")
        out[name] = value
    return out


_DERIVED: dict[type[torch.optim.Optimizer], dict[str, Any]] = {}


def _derived_defaults(cls: type[torch.optim.Optimizer], accepted: frozenset[str]) -> dict[str, Any]:
    """Group entries a class fills in without taking them as arguments, with the values it uses (probed once)."""
    found = _DERIVED.get(cls)
    if found is None:
        probe = cls([torch.zeros(1, requires_grad=True)])  # type: ignore[call-arg]  # each class has defaults
        found = _DERIVED[cls] = {k: v for k, v in probe.defaults.items() if k not in accepted}
    return found


def build_optimizer(name: str, hparams: dict[str, Any], param: torch.Tensor) -> torch.optim.Optimizer:
    """A torch.optim optimizer over one shard tensor; construction errors become ``BAD_OPTIMIZER`` replies."""
    cls = optimizer_class(name)
    cleaned = clean_hparams(cls, hparams)
    try:
        return cls([param], **cleaned)
    except (ValueError, TypeError) as exc:
        raise _bad(f"{cls.__name__}({cleaned}) refused: {exc}") from None


_CHECKED: dict[tuple[Any, ...], None] = {}


def check_overrides(cls: type[torch.optim.Optimizer], built: dict[str, Any], hp: dict[str, Any]) -> None:
    """Refuse (``BAD_OPTIMIZER``, by name) hyper-parameters a step asks for that ``cls`` does not take or would
    refuse to be built with (``built``: the group's settings as built; ``hp``: the step's differences)."""
    key = (cls, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in hp.items())))
    if key in _CHECKED:
        return
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"} - _IGNORED
    for name, value in hp.items():
        if name not in accepted:
            raise _bad(f"{cls.__name__} has no hyper-parameter {name!r}; it takes {', '.join(sorted(accepted))}")
        if name == "lr" and not (type(value) in (int, float) and 0 <= value <= MAX_LR):
            raise _bad(f"{cls.__name__}: lr must be a number in [0, {MAX_LR:g}], got {value!r}")
    merged = {k: v for k, v in built.items() if k in accepted}
    merged.update({k: tuple(v) if isinstance(v, list) else v for k, v in hp.items()})
    try:
        cls([torch.zeros(1, requires_grad=True)], **merged)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise _bad(f"{cls.__name__} refuses the step's hyper-parameters {hp}: {exc}") from None
    if len(_CHECKED) >= 4096:  # a scheduler makes a new set every step: keep the newest
        _CHECKED.pop(next(iter(_CHECKED)))
    _CHECKED[key] = None
