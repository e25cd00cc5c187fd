"""zps worker library: what a training script imports.

    from zps import worker
    worker.init()
    opt = worker.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    sampler = worker.shard_sampler(dataset)
"""
from .client import Client
from .data import shard_sampler
from .optimizer import DistributedOptimizer
from .session import barrier, default_client, init, num_workers, rank, shutdown

__all__ = ["Client", "barrier", "DistributedOptimizer", "default_client", "init", "num_workers", "rank", "shard_sampler", "shutdown"]
