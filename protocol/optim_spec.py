"""Optimizer configuration as it crosses the wire: a torch.optim class name plus per-group hyper-parameters.

Workers describe their own torch optimizer with :func:`describe_optimizer`; ``zps run --optimizer`` passes a
spec string such as ``adam:lr=1e-3,betas=(0.9,0.99)`` that :func:`parse_optimizer_spec` reads.
"""
from __future__ import annotations

import ast
import inspect
import math
from typing import Any

import torch

# Flags that change how, not what, torch computes; a worker's local choice must not decide the server's.
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})
_NOT_HPARAMS = frozenset({"params", "initial_lr", "name"}) | IMPLEMENTATION_FLAGS
# What the servers run: element-wise optimizers, which give the same result on a chunk as on the whole tensor.
SERVER_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta")
_WHY_NOT = {
    "LBFGS": "it re-evaluates the loss through a closure and searches along the whole parameter vector",
    "Adafactor": "its second moments are factored over whole rows and columns, which a server holding a chunk "
                 "does not have",
    "SparseAdam": "it takes sparse gradients",
}


def refuse_optimizer(cls: type) -> None:
    """ValueError naming ``cls`` and why, unless the servers can run it (:data:`SERVER_OPTIMIZERS`)."""
    if cls.__name__ in SERVER_OPTIMIZERS and cls is getattr(torch.optim, cls.__name__):
        return
    why = _WHY_NOT.get(cls.__name__, "the servers run torch.optim's element-wise optimizers only")
    raise ValueError(f"{cls.__module__}.{cls.__qualname__} cannot be stepped on the parameter servers: {why}; use one "
                     f"of {', '.join(SERVER_OPTIMIZERS)}")


def _accepted(name: str) -> frozenset[str]:
    """The hyper-parameters torch.optim.<name> takes (its constructor's arguments but params and flags)."""
    found = _ACCEPTED.get(name)
    if found is None:
        cls = getattr(torch.optim, name)
        found = _ACCEPTED[name] = frozenset(inspect.signature(cls.__init__).parameters) - {"self", "params"} \
            - IMPLEMENTATION_FLAGS
    return found


_ACCEPTED: dict[str, frozenset[str]] = {}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, tuple):
        value = list(value)
    return value


def hyperparameter_overrides(declared: tuple[str, list[dict[str, Any]]],
                             groups: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Per group, the hyper-parameters whose value differs from the one the servers' optimizer was built with
    (``declared``, as :func:`describe_optimizer` gave it); None when no group differs. Only names the optimizer
    takes count (a scheduler's own entries, e.g. OneCycleLR's ``max_lr``, are not hyper-parameters)."""
    name, base = declared
    accepted = _accepted(name) if name in SERVER_OPTIMIZERS else frozenset()
    out: list[dict[str, Any]] = []
    differs = False
    for index, group in enumerate(groups):
        built = base[index] if index < len(base) else {}
        changed = {}
        for key in accepted:
            if key not in group:
                continue
            value = _plain(group[key])
            if not (value is None or isinstance(value, (int, float, bool, list))):
                continue
            if key not in built or not _same(built[key], value):
                changed[key] = value
        out.append(changed)
        differs = differs or bool(changed)
    return out if differs else None


def describe_optimizer(optimizer: torch.optim.Optimizer) -> tuple[str, list[dict[str, Any]]]:
    """(class name, hyper-parameters per param group) of a torch optimizer, as msgpack-able values."""
    groups = []
    for group in optimizer.param_groups:
        hp: dict[str, Any] = {}
        for k, v in group.items():
            if k in _NOT_HPARAMS:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, tuple):
                v = list(v)
            if v is None or isinstance(v, (int, float, bool, list)):
                hp[k] = v
        groups.append(hp)
    return type(optimizer).__name__, groups


def _split_top_level(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse_optimizer_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"sgd:lr=0.1,momentum=0.9"`` -> ``("SGD", {"lr": 0.1, "momentum": 0.9})`` (class looked up in torch.optim)."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    classes = {n.lower(): n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)}
    if name.lower() not in classes:
        raise ValueError(f"optimizer spec {spec!r}: torch.optim has no optimizer {name!r}")
    params: dict[str, Any] = {}
    for item in _split_top_level(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"optimizer spec {spec!r}: {item!r} is not key=value")
        try:
            params[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"optimizer spec {spec!r}: value of {key.strip()!r} is not a literal: {value!r}") from None
    return classes[name.lower()], params


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check_job_optimizer(described: tuple[str, list[dict[str, Any]]], spec: str) -> None:
    """Refuse an optimizer that is not the job's ``--optimizer`` ``spec``: the class must be the spec's and every
    hyper-parameter the spec names must have the spec's value in every group (a scheduler may change them later).
    Raises ValueError saying what differs and how to build the job's optimizer."""
    name, hparams = parse_optimizer_spec(spec)
    cls, groups = described
    how = ("build it with zps.worker.build_optimizer(model.parameters()), which reads the job's setting, or "
           "drop --optimizer")
    if cls.lower() != name.lower():
        raise ValueError(f"the job sets --optimizer {spec!r} (ZPS_OPTIMIZER) but this script builds {cls}; {how}")
    for index, group in enumerate(groups):
        for key, value in hparams.items():
            if key in group and not _same(group[key], value):
                raise ValueError(f"the job sets --optimizer {spec!r} (ZPS_OPTIMIZER) but param group {index} of "
                                 f"this script's {cls} has {key}={group[key]!r}; {how}")


def check_optimizer_spec(spec: str) -> None:
    """ValueError naming what is wrong with an ``--optimizer`` spec: one the servers cannot run, a value that is not
    a finite number, or one torch refuses (``betas=0.9`` where a pair is needed, a misspelt name)."""
    name, hparams = parse_optimizer_spec(spec)
    cls = getattr(torch.optim, name)
    refuse_optimizer(cls)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    for key, value in hparams.items():
        default = defaults.get(key)
        if isinstance(default, tuple) and not (isinstance(value, (tuple, list)) and len(value) == len(default)):
            raise ValueError(f"{key} must be {len(default)} numbers, e.g. {key}={default}, got {key}={value!r}")
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ValueError(f"{key}={value!r} is not a finite number")
    try:
        build_from_spec(spec, [torch.zeros(1, requires_grad=True)])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"torch.optim.{name} refuses it: {exc}") from None


def build_from_spec(spec: str, params: Any) -> torch.optim.Optimizer:
    """A torch optimizer over ``params`` from a spec string."""
    name, hparams = parse_optimizer_spec(spec)
    return getattr(torch.optim, name)(params, **hparams)
