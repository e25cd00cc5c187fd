"""A worker's own training state, as a checkpoint part holds it: the optimizer's param groups (every
hyper-parameter a scheduler or the script set), the model's buffers (BatchNorm statistics), the random number
generators (torch's, CUDA's, Python's, NumPy's) and the zps samplers' positions.

Everything is JSON or a tensor (safetensors): nothing is pickled.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

log = logging.getLogger("zps.worker")
Tensors = dict[str, torch.Tensor]


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def group_state(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each param group's settings but its parameters (tuples become lists; what JSON cannot hold is left out)."""
    out = []
    for group in groups:
        kept = {}
        for name, value in group.items():
            if name == "params":
                continue
            if isinstance(value, tuple):
                value = list(value)
            if _jsonable(value):
                kept[name] = value
        out.append(kept)
    return out


def restore_groups(groups: list[dict[str, Any]], saved: list[dict[str, Any]]) -> None:
    """Set ``groups`` to what :func:`group_state` saved (a list where the group holds a tuple becomes a tuple)."""
    if len(saved) != len(groups):
        raise ValueError(f"the checkpoint holds {len(saved)} param groups, this optimizer has {len(groups)}")
    for group, values in zip(groups, saved, strict=True):
        for name, value in values.items():
            if isinstance(value, list) and isinstance(group.get(name), tuple):
                value = tuple(value)
            group[name] = value


def buffers(model: torch.nn.Module | None) -> Tensors:
    """The model's buffers, copied to the CPU (``buffer.<name>``)."""
    if model is None:
        return {}
    return {f"buffer.{name}": b.detach().to("cpu", copy=True) for name, b in model.named_buffers()}


def restore_buffers(model: torch.nn.Module | None, tensors: Tensors) -> None:
    if model is None:
        return
    mine = dict(model.named_buffers())
    saved = {n.split(".", 1)[1]: t for n, t in tensors.items() if n.startswith("buffer.")}
    if saved.keys() != mine.keys():
        raise ValueError(f"the checkpoint holds the buffers {sorted(saved)}, this model has {sorted(mine)}")
    with torch.no_grad():
        for name, value in saved.items():
            if value.shape != mine[name].shape:
                raise ValueError(f"buffer {name!r}: the checkpoint holds shape {tuple(value.shape)}, this model "
                                 f"{tuple(mine[name].shape)}")
            mine[name].copy_(value)


def rng_state() -> tuple[dict[str, Any], Tensors]:
    """Every random number generator a training script draws from: (JSON, tensors)."""
    tensors: Tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: Tensors) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((int(n.rsplit(".", 1)[1]), t) for n, t in tensors.items() if n.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t for _, t in cuda])
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in meta and "rng.numpy" in tensors:
        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def sampler_state(samplers: Iterable[Any]) -> list[dict[str, Any]]:
    return [s.state() for s in samplers]
