"""Optimizer configuration as it crosses the wire: a torch.optim class name plus per-group hyper-parameters.

Workers describe their own torch optimizer with :func:`describe_optimizer`; ``zps run --optimizer`` passes a
spec string such as ``adam:lr=1e-3,betas=(0.9,0.99)`` that :func:`parse_optimizer_spec` reads.
"""
from __future__ import annotations

import ast
from typing import Any

import torch

# Flags that change how, not what, torch computes; a worker's local choice must not decide the server's.
IMPLEMENTATION_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})
_NOT_HPARAMS = frozenset({"params", "initial_lr", "name"}) | IMPLEMENTATION_FLAGS


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


def build_from_spec(spec: str, params: Any) -> torch.optim.Optimizer:
    """A torch optimizer over ``params`` from a spec string."""
    name, hparams = parse_optimizer_spec(spec)
    return getattr(torch.optim, name)(params, **hparams)
