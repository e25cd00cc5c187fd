"""What changes when a DDP training script moves to zps, in one place, so each conformance script is one loop that
runs under both (``--backend ddp`` as torchrun would start it, ``--backend zps`` under ``zps run``).

The differences a user makes when porting, and nothing else:

* DDP: ``dist.init_process_group("gloo")``, ``DistributedDataParallel(model)``, the optimizer as is,
  ``DistributedSampler``, ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)``, ``model.no_sync()``;
* zps: ``worker.init()``, ``worker.DistributedOptimizer(optimizer, model)``, ``worker.shard_sampler``,
  ``opt.clip_grad_norm_(max_norm)``, ``opt.no_sync()``; script state that DDP scripts save with ``torch.save``
  goes to ``opt.on_checkpoint`` and comes back in ``opt.resumed``.

Rank 0 writes its module's state (parameters and buffers) and the script's extras to ``--out`` (safetensors).
"""
from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset, DistributedSampler


def parse(add: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["ddp", "zps"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    if add is not None:
        add(parser)
    return parser.parse_args()


class Port:
    """The backend a conformance script runs under."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        torch.use_deterministic_algorithms(True)
        if backend == "ddp":
            import torch.distributed as dist

            dist.init_process_group("gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            from zps import worker

            client = worker.init()
            self.rank, self.world = client.rank, client.num_workers
        self.opt: Any = None
        self.ddp: nn.Module | None = None

    @property
    def zps(self) -> bool:
        return self.backend == "zps"

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer, **ddp_options: Any) -> tuple[nn.Module, Any]:
        """(the module to call forward on, the optimizer to step)."""
        if self.backend == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, **ddp_options)
            self.opt = optimizer
            return self.ddp, optimizer
        from zps import worker

        self.opt = worker.DistributedOptimizer(optimizer, model, **self.zps_options)
        return model, self.opt

    zps_options: dict[str, Any] = {}

    def sampler(self, dataset: Dataset, **options: Any) -> DistributedSampler:
        if self.backend == "ddp":
            return DistributedSampler(dataset, **options)
        from zps import worker

        return worker.shard_sampler(dataset, **options)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """DDP's meaning: clip the averaged gradient by its global norm; that norm."""
        if self.backend == "ddp":
            return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
        return self.opt.clip_grad_norm_(max_norm, norm_type)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes that only accumulate (gradient accumulation)."""
        context: Any = self.ddp.no_sync() if self.ddp is not None else self.opt.no_sync()  # type: ignore[operator]
        with context:
            yield

    def on_checkpoint(self, state: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """zps: the script's own state goes with every checkpoint; returns what a resumed job got back."""
        if not self.zps:
            return None
        self.opt.on_checkpoint(state)
        return self.opt.resumed

    def finish(self, module: nn.Module, out: str, extras: dict[str, torch.Tensor] | None = None) -> None:
        """Rank 0 writes its module's parameters and buffers, and ``extras``; then the backend ends."""
        if self.zps:
            self.opt.synchronize()
        if self.rank == 0:
            state = {f"state.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()}
            state.update({f"extra.{k}": torch.as_tensor(v).detach().clone().contiguous()
                          for k, v in (extras or {}).items()})
            tmp = out + ".tmp"
            save_file(state, tmp)
            os.replace(tmp, out)
        if self.backend == "ddp":
            import torch.distributed as dist

            dist.barrier()  # every rank done before any tears gloo down (a rank torn down early aborts the other)
            dist.destroy_process_group()
        else:
            from zps import worker

            worker.shutdown()


def regression_data(seed: int, samples: int, features: int, outputs: int) -> torch.utils.data.TensorDataset:
    """A fixed data set (the same on every rank and backend)."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(samples, features, generator=g)
    w = torch.randn(features, outputs, generator=g)
    y = x @ w + 0.1 * torch.randn(samples, outputs, generator=g)
    return torch.utils.data.TensorDataset(x, y)
